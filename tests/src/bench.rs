//! What the bench programs share: percentiles and the printed table.

pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx]
}

pub struct Row {
    pub what: String,
    pub value: String,
    pub target: String,
    pub ok: bool,
}

pub fn print_table(rows: &[Row]) {
    println!("\n{:<100} {:>9} {:>11}", "benchmark", "value", "target");
    for r in rows {
        println!(
            "{:<100} {:>9} {:>11}  {}",
            r.what,
            r.value,
            r.target,
            if r.ok { "ok" } else { "MISSED" }
        );
    }
}
