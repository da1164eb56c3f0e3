//! The methods' command-line flags. Each method's folder declares the flags it reads as a
//! `clap::Args` struct (`SnellFlags`, ...), with their defaults, help and ranges, and its row of
//! `registry::METHODS` lists those groups. [`AdapterArgs`] is their union, made from the table,
//! for `finetune` and the benches: a flag is written once, in the method that reads it.
//!
//! A method reads its flags through [`Flags::read`], which refuses a group its row does not list,
//! so the row's list is what the method reads (the table's test builds every method). That list
//! is what lets a flag given to a method that does not read it be an error rather than silently
//! ignored, and what `bench methods` passes on to each method's child process.

use std::collections::BTreeSet;
use std::ffi::OsString;

use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command, FromArgMatches};

use super::registry::{self, Method, METHODS};
use super::{AdapterConfig, Targets};
use crate::error::{Error, Result};

/// A group of flags: a `clap::Args` struct's `augment_args`.
pub type FlagGroup = fn(Command) -> Command;

/// The largest rank a rank flag accepts (the ranks against the model's widths are checked where
/// the adapter is built, before anything is allocated).
pub const MAX_RANK: usize = 1 << 16;

/// A group of a method's flags: parsed from the command line, then checked.
pub trait MethodFlags: clap::Args + FromArgMatches {
    /// Every value within its range (each error names the flag).
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// The modules a per-linear method adapts.
#[derive(clap::Args, Debug, Clone)]
pub struct TargetFlags {
    /// Module names (matched against the end of the module path).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,up_proj,down_proj")]
    pub target_modules: Vec<String>,
}

impl MethodFlags for TargetFlags {}

impl TargetFlags {
    pub fn targets(&self) -> Targets {
        Targets::List(self.target_modules.clone())
    }
}

/// The flag values one method reads: the command line's, seen through the groups of its row.
pub struct Flags<'a> {
    matches: &'a ArgMatches,
    method: &'static Method,
}

impl Flags<'_> {
    /// The group `T`, checked. A group the method's row does not list is an error, which the
    /// table's test turns into a failure.
    pub fn read<T: MethodFlags>(&self) -> Result<T> {
        let listed = arg_ids(self.method.flags);
        if let Some(id) = group_args(&[T::augment_args]).iter().map(|a| a.get_id().to_string()).find(|id| !listed.contains(id)) {
            return Err(Error::msg(format!("method `{}` reads --{} but its row of registry::METHODS does not list that group", self.method.name, id.replace('_', "-"))));
        }
        let flags = T::from_arg_matches(self.matches).map_err(|e| Error::msg(e.to_string()))?;
        flags.validate()?;
        Ok(flags)
    }
}

/// The arguments of `groups`, each once.
fn group_args(groups: &[FlagGroup]) -> Vec<Arg> {
    let mut args: Vec<Arg> = Vec::new();
    for group in groups {
        for arg in group(Command::new("flags")).get_arguments() {
            if args.iter().all(|a| a.get_id() != arg.get_id()) {
                args.push(arg.clone());
            }
        }
    }
    args
}

fn arg_ids(groups: &[FlagGroup]) -> BTreeSet<String> {
    group_args(groups).iter().map(|a| a.get_id().to_string()).collect()
}

/// The adapter to train, PEFT-style: `--method` and the flags of every method in the table.
#[derive(Debug, Clone)]
pub struct AdapterArgs {
    /// The method's name (`registry::METHODS`).
    pub method: String,
    matches: ArgMatches,
}

impl AdapterArgs {
    /// The adapter flags alone, as `finetune` would read them (`["--method", "snell", "--r", "16"]`).
    pub fn parse<I, T>(flags: I) -> Result<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cmd = <Self as clap::Args>::augment_args(Command::new("adapter").no_binary_name(true));
        let matches = cmd.try_get_matches_from(flags).map_err(|e| Error::msg(e.to_string()))?;
        Self::from_arg_matches(&matches).map_err(|e| Error::msg(e.to_string()))
    }

    /// The config of `--method`, from its flags; a flag of another method is an error.
    pub fn to_config(&self) -> Result<AdapterConfig> {
        let method = registry::method(&self.method)?;
        self.check_read_by(&[method])?;
        self.config_for(method)
    }

    /// The config `method` makes from these flags (its own flags checked, others not looked at).
    pub fn config_for(&self, method: &'static Method) -> Result<AdapterConfig> {
        (method.config)(&Flags { matches: &self.matches, method })
    }

    /// Every flag given on the command line is read by one of `methods`: a flag that only another
    /// method reads would change nothing, which the user did not mean.
    pub fn check_read_by(&self, methods: &[&'static Method]) -> Result<()> {
        let read: BTreeSet<String> = methods.iter().flat_map(|m| arg_ids(m.flags)).collect();
        for arg in group_args(&every_group()) {
            let id = arg.get_id().as_str();
            if self.given(id) && !read.contains(id) {
                let readers: Vec<&str> = METHODS.iter().filter(|m| arg_ids(m.flags).contains(id)).map(|m| m.name).collect();
                let names: Vec<&str> = methods.iter().map(|m| m.name).collect();
                return Err(Error::msg(format!(
                    "--{} is not a flag of --method {} (it is read by {})",
                    arg.get_long().unwrap_or(id),
                    names.join(", "),
                    readers.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The flags given for `method`'s groups, as `--name=value`, for a child process that runs
    /// it (the others keep their defaults there as here).
    pub fn given_flags(&self, method: &Method) -> Vec<String> {
        group_args(method.flags)
            .iter()
            .filter(|arg| self.given(arg.get_id().as_str()))
            .filter_map(|arg| {
                let values: Vec<String> = self.matches.get_raw(arg.get_id().as_str())?.map(|v| v.to_string_lossy().into_owned()).collect();
                Some(format!("--{}={}", arg.get_long()?, values.join(",")))
            })
            .collect()
    }

    fn given(&self, id: &str) -> bool {
        self.matches.value_source(id) == Some(ValueSource::CommandLine)
    }
}

/// Every group of the table, in table order (a group shared by several rows is listed once by
/// [`group_args`], which keeps the first definition of each flag).
fn every_group() -> Vec<FlagGroup> {
    METHODS.iter().flat_map(|m| m.flags.iter().copied()).collect()
}

impl clap::Args for AdapterArgs {
    fn augment_args(cmd: Command) -> Command {
        let names = METHODS.iter().map(|m| PossibleValue::new(m.name).help(m.summary));
        let method = Arg::new("method").long("method").default_value("lora").value_parser(PossibleValuesParser::new(names)).help("The method");
        let mut cmd = cmd.arg(method);
        for arg in group_args(&every_group()) {
            cmd = cmd.arg(arg);
        }
        cmd
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for AdapterArgs {
    fn from_arg_matches(matches: &ArgMatches) -> std::result::Result<Self, clap::Error> {
        let method = matches.get_one::<String>("method").cloned().unwrap_or_else(|| "lora".into());
        Ok(Self { method, matches: matches.clone() })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> std::result::Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_is_read_by_its_method_refused_elsewhere_and_passed_on() {
        let snell = AdapterArgs::parse(["--method", "snell", "--r", "16", "--sparsity=0.25"]).unwrap();
        let cfg = snell.to_config().unwrap();
        let cfg = cfg.downcast_ref::<super::super::SnellConfig>().unwrap();
        assert_eq!((cfg.r, cfg.sparsity, cfg.heads), (16, 0.25, 2));
        assert_eq!(snell.given_flags(registry::method("snell").unwrap()), ["--r=16", "--sparsity=0.25"]);

        let e = AdapterArgs::parse(["--method", "lora", "--sparsity", "0.3"]).unwrap().to_config().unwrap_err().to_string();
        assert!(e.contains("--sparsity") && e.contains("lora") && e.contains("snell"), "{e}");

        let e = AdapterArgs::parse(["--method", "snell", "--sparsity", "1.5"]).unwrap().to_config().unwrap_err().to_string();
        assert!(e.contains("--sparsity 1.5"), "{e}");
        let lists = AdapterArgs::parse(["--target-modules", "q_proj,v_proj"]).unwrap();
        assert_eq!(lists.given_flags(registry::method("lora").unwrap()), ["--target-modules=q_proj,v_proj"]);
    }
}
