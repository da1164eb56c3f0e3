//! Every method the engine trains, in one table: its name (`--method`, `bench methods`), what it
//! is, its `peft_type` and the reader of that `adapter_config.json`, the flag groups it reads and
//! how its config is made from them. The CLI's help and parsing, `bench methods`, the adapter
//! loader and the tests all read this table; a method is added here with one row (and its
//! folder beside this file).

use std::path::Path;

use serde_json::Value;

use super::config::ReadConfig;
use super::flags::{FlagGroup, Flags};
use super::{adalora, control, full, ia3, lora, nonlinear_control, sift, snell, synqt};
use super::{AdaLoraConfig, AdapterConfig, ControlConfig, EvaConfig, FullConfig, Ia3Config, InitKind, LoraConfig, LoraInitConfig, NonlinearControlConfig, SiftConfig, SnellConfig, SynqtConfig};
use crate::error::{Error, Result};

/// One row of the table.
pub struct Method {
    pub name: &'static str,
    pub summary: &'static str,
    /// `peft_type` in `adapter_config.json`; rows that share one share its reader.
    pub peft_type: &'static str,
    /// Reads an `adapter_config.json` of this `peft_type`.
    pub read: fn(&Value, &Path) -> Result<ReadConfig>,
    /// The flag groups the method reads (`Flags::read` refuses any other).
    pub flags: &'static [FlagGroup],
    /// The config from the user's flags.
    pub config: fn(&Flags) -> Result<AdapterConfig>,
}

#[rustfmt::skip]
pub const METHODS: &[Method] = &[
    Method { name: "lora", peft_type: "LORA", read: lora::read_peft_lora, flags: lora::FLAGS, summary: "LoRA (PEFT's LoraConfig)",
        config: |f| Ok(LoraConfig::from_flags(f, false, false)?.into()) },
    Method { name: "rslora", peft_type: "LORA", read: lora::read_peft_lora, flags: lora::FLAGS, summary: "rank-stabilized LoRA: scale alpha / sqrt(r)",
        config: |f| Ok(LoraConfig::from_flags(f, true, false)?.into()) },
    Method { name: "dora", peft_type: "LORA", read: lora::read_peft_lora, flags: lora::FLAGS, summary: "DoRA: LoRA with a trained magnitude per output row",
        config: |f| Ok(LoraConfig::from_flags(f, false, true)?.into()) },
    Method { name: "ia3", peft_type: "IA3", read: ia3::read_peft_ia3, flags: ia3::FLAGS, summary: "IA3: learned scales of outputs, or of inputs for --feedforward-modules",
        config: |f| Ok(Ia3Config::from_flags(f)?.into()) },
    Method { name: "pissa", peft_type: "LORA", read: lora::read_peft_lora, flags: lora::FLAGS, summary: "LoRA initialised from W's principal singular vectors",
        config: |f| Ok(LoraInitConfig { lora: LoraConfig::from_flags(f, false, false)?, kind: InitKind::Pissa }.into()) },
    Method { name: "olora", peft_type: "LORA", read: lora::read_peft_lora, flags: lora::FLAGS, summary: "LoRA initialised from W's QR decomposition",
        config: |f| Ok(LoraInitConfig { lora: LoraConfig::from_flags(f, false, false)?, kind: InitKind::Olora }.into()) },
    Method { name: "eva", peft_type: "LORA", read: lora::read_peft_lora, flags: lora::FLAGS, summary: "LoRA initialised from the activations' SVD, ranks redistributed",
        config: |f| Ok(EvaConfig::new(LoraConfig::from_flags(f, false, false)?).into()) },
    Method { name: "adalora", peft_type: "ADALORA", read: adalora::read_peft_adalora, flags: adalora::FLAGS, summary: "AdaLoRA: SVD-form LoRA whose ranks are pruned by importance",
        config: |f| Ok(AdaLoraConfig::from_flags(f)?.into()) },
    Method { name: "sift", peft_type: "SIFT", read: sift::read_sift, flags: sift::FLAGS, summary: "sparse increment fine-tuning of --sparse-rate of each weight",
        config: |f| Ok(SiftConfig::from_flags(f)?.into()) },
    Method { name: "full", peft_type: "FULL", read: full::read_full, flags: full::FLAGS, summary: "full fine-tuning of the targeted weights",
        config: |f| Ok(FullConfig::from_flags(f, false)?.into()) },
    Method { name: "galore", peft_type: "FULL", read: full::read_full, flags: full::GALORE_FLAGS, summary: "full fine-tuning with GaLore's low-rank gradient projection",
        config: |f| Ok(FullConfig::from_flags(f, true)?.into()) },
    Method { name: "control", peft_type: "CONTROL", read: control::read_control, flags: control::FLAGS, summary: "Parallel Control across each MLP block",
        config: |f| Ok(ControlConfig::from_flags(f, false, false)?.into()) },
    Method { name: "double_control", peft_type: "CONTROL", read: control::read_control, flags: control::FLAGS, summary: "Parallel Control across the MLP and the attention blocks",
        config: |f| Ok(ControlConfig::from_flags(f, true, false)?.into()) },
    Method { name: "control_lora", peft_type: "CONTROL", read: control::read_control, flags: control::WITH_LORA_FLAGS, summary: "control on the MLP block + LoRA on the targets",
        config: |f| Ok(ControlConfig::from_flags(f, false, true)?.into()) },
    Method { name: "nonlinear_control", peft_type: "NONLINEAR_CONTROL", read: nonlinear_control::read_nonlinear_control, flags: nonlinear_control::FLAGS, summary: "Control with the parameter-free attention controller",
        config: |f| Ok(NonlinearControlConfig::from_flags(f)?.into()) },
    Method { name: "snell", peft_type: "SNELL", read: snell::read_snell, flags: snell::FLAGS, summary: "SNELL: kernelized LoRA with competition-based sparsification (--sparsity 0: KLoRA)",
        config: |f| Ok(SnellConfig::from_flags(f)?.into()) },
    Method { name: "synqt", peft_type: "SYNQT", read: synqt::read_synqt, flags: synqt::FLAGS, summary: "SynQT: query tokens beside a frozen ViT, the image path without a graph (vision only)",
        config: |f| Ok(SynqtConfig::from_flags(f)?.into()) },
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
    use crate::adapters::flags::AdapterArgs;

    #[test]
    fn every_method_makes_its_config_and_names_are_unique() {
        for (i, m) in METHODS.iter().enumerate() {
            // Every group the method reads is in its row (`Flags::read` refuses others).
            let cfg = AdapterArgs::parse(["--method", m.name]).and_then(|a| a.to_config()).unwrap_or_else(|e| panic!("{}: {e}", m.name));
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
