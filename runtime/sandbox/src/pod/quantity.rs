//! Kubernetes resource quantities (`128Mi`, `1.5G`, `500m`, `2`): parsing
//! only, into bytes or millicores. Rejects anything Kubernetes would reject.

/// Parses a memory quantity into bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (num, mult) = split(s)?;
    let v = num * mult;
    if !(0.0..=(u64::MAX as f64)).contains(&v) {
        return Err(format!("quantity {s:?} is out of range"));
    }
    Ok(v.ceil() as u64)
}

/// Parses a CPU quantity into millicores (`500m` → 500, `2` → 2000).
pub fn parse_millicores(s: &str) -> Result<u64, String> {
    let (num, mult) = split(s)?;
    let v = num * mult * 1000.0;
    if !(0.0..=(u64::MAX as f64)).contains(&v) {
        return Err(format!("quantity {s:?} is out of range"));
    }
    Ok(v.ceil() as u64)
}

fn split(s: &str) -> Result<(f64, f64), String> {
    let t = s.trim();
    let bad = || {
        format!("invalid quantity {s:?}: expected a number with an optional suffix (m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei), e.g. 128Mi or 500m")
    };
    if t.is_empty() {
        return Err(bad());
    }
    let idx = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(idx);
    let mut num: f64 = num.parse().map_err(|_| bad())?;
    if num < 0.0 {
        return Err(format!("invalid quantity {s:?}: must not be negative"));
    }
    let mult = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().map_err(|_| bad())?;
            num *= 10f64.powi(exp);
            1.0
        }
        _ => return Err(bad()),
    };
    Ok((num, mult))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory() {
        assert_eq!(parse_bytes("128Mi").unwrap(), 128 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("1.5Ki").unwrap(), 1536);
        assert_eq!(parse_bytes("1e3").unwrap(), 1000);
        assert_eq!(parse_bytes("42").unwrap(), 42);
        assert!(parse_bytes("12Zi").is_err());
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("-1Mi").is_err());
    }

    #[test]
    fn cpu() {
        assert_eq!(parse_millicores("500m").unwrap(), 500);
        assert_eq!(parse_millicores("2").unwrap(), 2000);
        assert_eq!(parse_millicores("0.25").unwrap(), 250);
        assert!(parse_millicores("lots").is_err());
    }
}
