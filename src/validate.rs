//! Checks on the numbers a user gives on the command line (or in `--config`), before anything is
//! sized from them: each failure names the flag, the value and the range it must lie in.

use crate::error::{Error, Result};

fn bad(flag: &str, value: impl std::fmt::Display, range: &str) -> Error {
    Error::msg(format!("--{flag} {value}: must be {range}"))
}

/// An integer flag in `[min, max]`.
pub fn int_in(flag: &str, value: usize, min: usize, max: usize) -> Result<()> {
    if value < min || value > max {
        return Err(bad(flag, value, &format!("between {min} and {max}")));
    }
    Ok(())
}

/// A finite number with `min < value` (or `min <= value` when `min_inclusive`) and `value < max`
/// (or `<=` when `max_inclusive`).
pub fn real_in(flag: &str, value: f64, (min, min_inclusive): (f64, bool), (max, max_inclusive): (f64, bool)) -> Result<()> {
    let above = if min_inclusive { value >= min } else { value > min };
    let below = if max_inclusive { value <= max } else { value < max };
    if !value.is_finite() || !above || !below {
        let (open, close) = (if min_inclusive { "[" } else { "(" }, if max_inclusive { "]" } else { ")" });
        return Err(bad(flag, value, &format!("a finite number in {open}{min}, {max}{close}")));
    }
    Ok(())
}

/// A finite number above zero and at most `max`.
pub fn positive(flag: &str, value: f64, max: f64) -> Result<()> {
    real_in(flag, value, (0.0, false), (max, true))
}

/// A probability of dropping: `[0, 1)` (1 would drop everything and scale by 1/0).
pub fn dropout(flag: &str, value: f64) -> Result<()> {
    real_in(flag, value, (0.0, true), (1.0, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bound_is_checked_and_named() {
        assert!(int_in("batch-size", 0, 1, 10).unwrap_err().to_string().contains("--batch-size 0"));
        assert!(int_in("batch-size", 1, 1, 10).is_ok());
        assert!(positive("learning-rate", f64::NAN, 1.0).unwrap_err().to_string().contains("--learning-rate NaN"));
        assert!(positive("learning-rate", -1.0, 1.0).is_err());
        assert!(positive("learning-rate", 0.0, 1.0).is_err());
        assert!(positive("learning-rate", 1.0, 1.0).is_ok());
        assert!(positive("num-epochs", 1e300, 1e4).is_err());
        assert!(dropout("lora-dropout", 1.0).unwrap_err().to_string().contains("[0, 1)"));
        assert!(dropout("lora-dropout", 0.0).is_ok());
        assert!(real_in("x", f64::INFINITY, (0.0, true), (f64::MAX, true)).is_err());
    }
}
