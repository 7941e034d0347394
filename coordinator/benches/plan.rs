//! Planning a backup run over 1,000 nodes × 50 PVCs (50,000 PVCs and pods), as the controller does
//! from its informer caches. Prints p50/p99 over 50 runs; target p99 <= 20 ms.
//!   cargo bench -p stowage-coordinator --bench plan

use std::hint::black_box;
use std::time::Instant;

use stowage_coordinator::plan::{PodInfo, PvcInfo, plan};

fn main() {
    let (nodes, per_node) = (1000usize, 50usize);
    let mut pvcs = Vec::with_capacity(nodes * per_node);
    let mut pods = Vec::with_capacity(nodes * per_node);
    for n in 0..nodes {
        for v in 0..per_node {
            let name = format!("data-{n}-{v}");
            pvcs.push(PvcInfo {
                namespace: format!("ns-{}", n % 20),
                name: name.clone(),
                labels: [(
                    "tier".to_string(),
                    if v % 2 == 0 { "db" } else { "web" }.to_string(),
                )]
                .into(),
                volume_name: Some(format!("pv-{n}-{v}")),
                ..Default::default()
            });
            pods.push(PodInfo {
                namespace: format!("ns-{}", n % 20),
                name: format!("app-{n}-{v}"),
                uid: format!("{n:08x}-{v:04x}"),
                node: Some(format!("node-{n}")),
                running: true,
                claims: vec![name],
                ..Default::default()
            });
        }
    }
    let agent_names: Vec<String> = (0..nodes).map(|n| format!("node-{n}")).collect();
    let agents: Vec<&str> = agent_names.iter().map(String::as_str).collect();
    let mut times = Vec::new();
    for _ in 0..55 {
        let started = Instant::now();
        let p =
            plan(None, black_box(&pvcs), black_box(&pods), black_box(&agents)).unwrap_or_default();
        let took = started.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(p.volume_count(), nodes * per_node);
        times.push(took);
    }
    let mut times = times.split_off(5); // warm-up
    times.sort_by(f64::total_cmp);
    let pct = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!("\n{:<70} {:>9} {:>9}", "benchmark", "value", "target");
    println!(
        "{:<70} {:>9.2} {:>9}",
        "plan 1,000 nodes x 50 PVCs, p50 (ms)",
        pct(0.5),
        ""
    );
    println!(
        "{:<70} {:>9.2} {:>9}",
        "plan 1,000 nodes x 50 PVCs, p99 (ms)",
        pct(0.99),
        "<= 20"
    );
}
