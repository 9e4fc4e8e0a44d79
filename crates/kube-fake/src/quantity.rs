//! Resource quantities (`512Mi`, `250m`, `2`, `1e3`): parsed exactly enough to add and
//! compare them, and rendered in the API server's canonical form, so quota usage reads
//! like a cluster's (`1536Mi`, `500m`, `2Gi`).

use std::cmp::Ordering;
use std::fmt;

/// Nano-units per unit: quantities are held as whole nano-units, the finest precision
/// the API server keeps (finer values round up, as it rounds them).
const NANO: i128 = 1_000_000_000;

/// Which suffix family a quantity was written in; its canonical form keeps the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// `Ki`, `Mi`, `Gi`, …
    BinarySi,
    /// `m`, `k`, `M`, `G`, …, plain numbers and exponents.
    DecimalSi,
}

/// A parsed quantity. Equality and order compare amounts; the format only decides how
/// it is rendered.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Quantity {
    nanos: i128,
    format: Format,
}

const BINARY: [(&str, u32); 6] = [
    ("Ki", 10),
    ("Mi", 20),
    ("Gi", 30),
    ("Ti", 40),
    ("Pi", 50),
    ("Ei", 60),
];

const DECIMAL: [(&str, i32); 10] = [
    ("n", -9),
    ("u", -6),
    ("m", -3),
    ("", 0),
    ("k", 3),
    ("M", 6),
    ("G", 9),
    ("T", 12),
    ("P", 15),
    ("E", 18),
];

/// `value * 10^exp`, rounding up when digits are dropped; `None` on overflow.
fn scale10(value: i128, exp: i32) -> Option<i128> {
    if exp >= 0 {
        value.checked_mul(10i128.checked_pow(exp.unsigned_abs())?)
    } else {
        let div = 10i128.checked_pow(exp.unsigned_abs())?;
        let q = value / div;
        Some(if value % div > 0 { q + 1 } else { q })
    }
}

impl Quantity {
    pub const ZERO: Quantity = Quantity {
        nanos: 0,
        format: Format::DecimalSi,
    };

    /// A plain count (`pods`), rendered as an integer.
    pub fn count(n: i64) -> Self {
        Self {
            nanos: i128::from(n) * NANO,
            format: Format::DecimalSi,
        }
    }

    /// Parses a quantity string or a JSON number; `None` when it is not one.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let (negative, s) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(end);
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
            return None;
        }
        let digits = format!("{int}{frac}");
        let mantissa: i128 = digits.parse().ok()?;
        let frac_digits = i32::try_from(frac.len()).ok()?;
        let (nanos, format) = if let Some((_, shift)) = BINARY.iter().find(|(s, _)| *s == suffix) {
            let bytes = mantissa.checked_mul(1i128 << shift)?;
            (scale10(bytes, 9 - frac_digits)?, Format::BinarySi)
        } else if let Some((_, exp)) = DECIMAL.iter().find(|(s, _)| *s == suffix) {
            (scale10(mantissa, 9 + exp - frac_digits)?, Format::DecimalSi)
        } else {
            let exp = suffix.strip_prefix(['e', 'E'])?;
            let exp: i32 = exp.parse().ok()?;
            (
                scale10(mantissa, 9i32.checked_add(exp)? - frac_digits)?,
                Format::DecimalSi,
            )
        };
        Some(Self {
            nanos: if negative { -nanos } else { nanos },
            format,
        })
    }

    /// The sum, in the format of `self` (as the API server's `Add` keeps it).
    pub fn add(self, other: Self) -> Self {
        Self {
            nanos: self.nanos.saturating_add(other.nanos),
            format: self.format,
        }
    }

    /// The larger of the two (how init containers and pod totals combine).
    pub fn max(self, other: Self) -> Self {
        if other.nanos > self.nanos {
            other
        } else {
            self
        }
    }
}

impl PartialEq for Quantity {
    fn eq(&self, other: &Self) -> bool {
        self.nanos == other.nanos
    }
}

impl PartialOrd for Quantity {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.nanos.cmp(&other.nanos))
    }
}

impl fmt::Display for Quantity {
    /// The canonical form: binary quantities of at least 1Ki in whole bytes take the
    /// largest binary suffix that divides them exactly; everything else the largest
    /// decimal suffix that leaves an integer.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nanos == 0 {
            return f.write_str("0");
        }
        if self.format == Format::BinarySi && self.nanos % NANO == 0 {
            let bytes = self.nanos / NANO;
            if bytes.abs() >= 1024 {
                let mut amount = bytes;
                let mut steps = 0usize;
                while steps < BINARY.len() && amount % 1024 == 0 {
                    amount /= 1024;
                    steps += 1;
                }
                let suffix = match steps {
                    0 => "",
                    n => BINARY[n - 1].0,
                };
                return write!(f, "{amount}{suffix}");
            }
        }
        let mut amount = self.nanos;
        let mut exp = -9;
        while exp < 18 && amount % 1000 == 0 {
            amount /= 1000;
            exp += 3;
        }
        let suffix = DECIMAL
            .iter()
            .find(|(_, e)| *e == exp)
            .map_or("", |(s, _)| *s);
        write!(f, "{amount}{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity::parse(s).unwrap_or_else(|| panic!("{s} parses"))
    }

    #[test]
    fn parses_binary_decimal_and_milli_suffixes() {
        assert_eq!(q("1Ki"), q("1024"));
        assert_eq!(q("1.5Gi"), q("1536Mi"));
        assert_eq!(q("250m"), q("0.25"));
        assert_eq!(q("1e3"), q("1k"));
        assert_eq!(q("2G"), q("2000M"));
        assert!(q("4Gi") > q("3.9Gi"));
        assert!(q("100m") < q("1"));
        for bad in ["", "Mi", "1..2", "512MB", "1e", "abc"] {
            assert!(Quantity::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn renders_the_canonical_form() {
        assert_eq!(q("1024Mi").to_string(), "1Gi");
        assert_eq!(q("512Mi").add(q("1Gi")).to_string(), "1536Mi");
        assert_eq!(q("250m").add(q("250m")).to_string(), "500m");
        assert_eq!(q("500m").add(q("0.5")).to_string(), "1");
        assert_eq!(q("1500").to_string(), "1500");
        assert_eq!(q("2000").to_string(), "2k");
        assert_eq!(q("512").to_string(), "512");
        assert_eq!(Quantity::count(3).to_string(), "3");
        assert_eq!(Quantity::ZERO.to_string(), "0");
        // Decimal memory stays decimal.
        assert_eq!(q("1G").add(q("500M")).to_string(), "1500M");
    }
}
