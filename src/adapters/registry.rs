//! Every method the engine trains, in one table: its name (`--method`, `bench methods`), what it
//! is, its `peft_type` and the reader of that `adapter_config.json`, and how its config is made
//! from the options a user gives. The CLI's help and parsing, `bench methods`, the adapter
//! loader and the tests all read this table; a method is added here with one row (and its
//! module beside this file).

use std::path::Path;

use serde_json::Value;

use super::config::ReadConfig;
use super::control::{read_control, ControlConfig};
use super::galore::GaloreConfig;
use super::nonlinear_control::{read_nonlinear_control, NonlinearControlConfig};
use super::lora::read_peft_lora as lora_file;
use super::{adalora, full, ia3, sift, snell};
use super::{AdaLoraConfig, AdapterConfig, EvaConfig, FullConfig, Ia3Config, InitKind, LoraConfig, LoraInitConfig, SiftConfig, SnellConfig, Targets};
use crate::error::{Error, Result};

/// The options every method draws its config from (the CLI's adapter flags, by the same names).
#[derive(Debug, Clone, PartialEq)]
pub struct MethodOptions {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    /// IA3: the targets whose input (not output) is scaled.
    pub feedforward_modules: Vec<String>,
    pub control_rank: usize,
    pub control_alpha: f64,
    pub control_dropout: f64,
    pub double_control_rank: usize,
    pub stable_mode: bool,
    /// AdaLoRA's initial rank per layer (default 3·r, as EfficientFT) and final average (default r).
    pub adalora_init_r: Option<usize>,
    pub adalora_target_r: Option<usize>,
    pub sparse_rate: f64,
    pub snell_heads: usize,
    pub sparsity: f64,
    /// GaLore's projection rank (default r).
    pub galore_rank: Option<usize>,
    pub galore_update_proj_gap: usize,
    pub galore_scale: f64,
}

impl Default for MethodOptions {
    /// The CLI's defaults.
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"].map(String::from).to_vec(),
            feedforward_modules: vec!["down_proj".into()],
            control_rank: 64,
            control_alpha: 1.0,
            control_dropout: 0.0,
            double_control_rank: 64,
            stable_mode: false,
            adalora_init_r: None,
            adalora_target_r: None,
            sparse_rate: 0.2,
            snell_heads: 2,
            sparsity: 0.5,
            galore_rank: None,
            galore_update_proj_gap: 500,
            galore_scale: 4.0,
        }
    }
}

impl MethodOptions {
    fn targets(&self) -> Targets {
        Targets::List(self.target_modules.clone())
    }

    fn lora(&self, use_rslora: bool, use_dora: bool) -> LoraConfig {
        LoraConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: self.targets(),
            use_rslora,
            use_dora,
        }
    }

    fn control(&self, double_control: bool, lora: Option<LoraConfig>) -> ControlConfig {
        ControlConfig {
            control_rank: self.control_rank,
            control_alpha: self.control_alpha,
            control_dropout: self.control_dropout,
            double_control,
            double_control_rank: self.double_control_rank,
            lora,
        }
    }

    fn adalora(&self) -> AdaLoraConfig {
        let mut c = AdaLoraConfig::new(self.targets(), self.adalora_init_r.unwrap_or(3 * self.r), self.adalora_target_r.unwrap_or(self.r), 0);
        // The trainer knows the number of steps: `training::configure_trainer` fills it in.
        c.total_step = None;
        c.lora_alpha = self.lora_alpha;
        c.lora_dropout = self.lora_dropout;
        c
    }

    fn snell(&self) -> Result<SnellConfig> {
        let c = SnellConfig { r: self.r, heads: self.snell_heads, sparsity: self.sparsity, target_modules: self.targets() };
        c.validate("--method snell")?;
        Ok(c)
    }

    fn full(&self, galore: bool) -> FullConfig {
        FullConfig {
            target_modules: self.targets(),
            galore: galore.then(|| GaloreConfig {
                rank: self.galore_rank.unwrap_or(self.r),
                update_proj_gap: self.galore_update_proj_gap,
                scale: self.galore_scale,
            }),
        }
    }
}

/// One row of the table.
pub struct Method {
    pub name: &'static str,
    pub summary: &'static str,
    /// `peft_type` in `adapter_config.json`; rows that share one share its reader.
    pub peft_type: &'static str,
    /// Reads an `adapter_config.json` of this `peft_type`.
    pub read: fn(&Value, &Path) -> Result<ReadConfig>,
    /// The config from the user's options.
    pub config: fn(&MethodOptions) -> Result<AdapterConfig>,
}

#[rustfmt::skip]
pub const METHODS: &[Method] = &[
    Method { name: "lora", peft_type: "LORA", read: lora_file, summary: "LoRA (PEFT's LoraConfig)",
        config: |o| Ok(o.lora(false, false).into()) },
    Method { name: "rslora", peft_type: "LORA", read: lora_file, summary: "rank-stabilized LoRA: scale alpha / sqrt(r)",
        config: |o| Ok(o.lora(true, false).into()) },
    Method { name: "dora", peft_type: "LORA", read: lora_file, summary: "DoRA: LoRA with a trained magnitude per output row",
        config: |o| Ok(o.lora(false, true).into()) },
    Method { name: "ia3", peft_type: "IA3", read: ia3::read_peft_ia3, summary: "IA3: learned scales of outputs, or of inputs for --feedforward-modules",
        config: |o| Ok(Ia3Config { target_modules: o.targets(), feedforward_modules: Some(Targets::List(o.feedforward_modules.clone())) }.into()) },
    Method { name: "pissa", peft_type: "LORA", read: lora_file, summary: "LoRA initialised from W's principal singular vectors",
        config: |o| Ok(LoraInitConfig { lora: o.lora(false, false), kind: InitKind::Pissa }.into()) },
    Method { name: "olora", peft_type: "LORA", read: lora_file, summary: "LoRA initialised from W's QR decomposition",
        config: |o| Ok(LoraInitConfig { lora: o.lora(false, false), kind: InitKind::Olora }.into()) },
    Method { name: "eva", peft_type: "LORA", read: lora_file, summary: "LoRA initialised from the activations' SVD, ranks redistributed",
        config: |o| Ok(EvaConfig::new(o.lora(false, false)).into()) },
    Method { name: "adalora", peft_type: "ADALORA", read: adalora::read_peft_adalora, summary: "AdaLoRA: SVD-form LoRA whose ranks are pruned by importance",
        config: |o| Ok(o.adalora().into()) },
    Method { name: "sift", peft_type: "SIFT", read: sift::read_sift, summary: "sparse increment fine-tuning of --sparse-rate of each weight",
        config: |o| Ok(SiftConfig { target_modules: o.targets(), sparse_rate: o.sparse_rate }.into()) },
    Method { name: "full", peft_type: "FULL", read: full::read_full, summary: "full fine-tuning of the targeted weights",
        config: |o| Ok(o.full(false).into()) },
    Method { name: "galore", peft_type: "FULL", read: full::read_full, summary: "full fine-tuning with GaLore's low-rank gradient projection",
        config: |o| Ok(o.full(true).into()) },
    Method { name: "control", peft_type: "CONTROL", read: read_control, summary: "Parallel Control across each MLP block",
        config: |o| Ok(o.control(false, None).into()) },
    Method { name: "double_control", peft_type: "CONTROL", read: read_control, summary: "Parallel Control across the MLP and the attention blocks",
        config: |o| Ok(o.control(true, None).into()) },
    Method { name: "control_lora", peft_type: "CONTROL", read: read_control, summary: "control on the MLP block + LoRA on the targets",
        config: |o| Ok(o.control(false, Some(o.lora(false, false))).into()) },
    Method { name: "nonlinear_control", peft_type: "NONLINEAR_CONTROL", read: read_nonlinear_control, summary: "Control with the parameter-free attention controller",
        config: |o| Ok(NonlinearControlConfig { control_rank: o.control_rank, stable_mode: o.stable_mode }.into()) },
    Method { name: "snell", peft_type: "SNELL", read: snell::read_snell, summary: "SNELL: kernelized LoRA with competition-based sparsification (--sparsity 0: KLoRA)",
        config: |o| Ok(o.snell()?.into()) },
];

/// The method called `name`, or an error listing them all.
pub fn method(name: &str) -> Result<&'static Method> {
    METHODS.iter().find(|m| m.name == name).ok_or_else(|| {
        let names: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
        Error::msg(format!("unknown method `{name}` ({})", names.join(", ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_makes_its_config_and_names_are_unique() {
        let options = MethodOptions::default();
        for (i, m) in METHODS.iter().enumerate() {
            let cfg = (m.config)(&options).unwrap_or_else(|e| panic!("{}: {e}", m.name));
            // The row's peft_type is its config's, and its reader reads what the config writes.
            assert_eq!(cfg.peft_type(), m.peft_type, "{}", m.name);
            let (read, _) = (m.read)(&cfg.to_peft_json(None), Path::new("x.json")).unwrap_or_else(|e| panic!("{}: {e}", m.name));
            assert_eq!(read, cfg, "{}", m.name);
            assert!(METHODS[..i].iter().all(|other| other.name != m.name), "{} twice", m.name);
            assert!(!m.summary.is_empty());
        }
        let e = method("lorra").err().unwrap().to_string();
        assert!(e.contains("lorra") && e.contains("snell"), "{e}");
    }
}
