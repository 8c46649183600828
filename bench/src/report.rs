//! Turns a run's records into the markdown table and the SVG chart of the results.
//!
//! Rows are (scenario, variant, compression) in the order the runs happened; inside a
//! row syncgate comes first and every peer is compared with it. The chart draws one bar
//! per peer and row on a log scale around 1: throughput as syncgate / peer (right of 1:
//! syncgate is faster), CPU time per operation and memory per idle connection as
//! syncgate / peer (left of 1: syncgate needs less).

use std::fmt::Write as _;

use crate::record::Record;
#[cfg(test)]
use crate::record::{Switches, ThreadCpu};

/// The server every other one is compared with.
pub const BASELINE: &str = "syncgate";

/// Peer colours in the chart, in order of first appearance.
const COLOURS: &[&str] = &["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2"];

/// One table row: a scenario variant and every server's record for it.
struct Row<'a> {
    /// Scenario name, e.g. `echo`.
    scenario: &'a str,
    /// The variant inside the scenario, e.g. `512 B x 100 conns`.
    variant: &'a str,
    /// permessage-deflate was on.
    compressed: bool,
    /// syncgate's record, if it ran.
    baseline: Option<&'a Record>,
    /// The other servers' records, in run order.
    peers: Vec<&'a Record>,
}

impl Row<'_> {
    fn title(&self) -> String {
        format!(
            "{} {}{}",
            self.scenario,
            self.variant,
            if self.compressed { " (deflate)" } else { "" }
        )
    }
}

fn rows(records: &[Record]) -> Vec<Row<'_>> {
    let mut out: Vec<Row<'_>> = Vec::new();
    for r in records {
        let i = match out.iter().position(|row| {
            (row.scenario, row.variant, row.compressed) == (&r.scenario, &r.variant, r.compressed)
        }) {
            Some(i) => i,
            None => {
                out.push(Row {
                    scenario: &r.scenario,
                    variant: &r.variant,
                    compressed: r.compressed,
                    baseline: None,
                    peers: Vec::new(),
                });
                out.len() - 1
            }
        };
        if r.server == BASELINE {
            out[i].baseline = Some(r);
        } else {
            out[i].peers.push(r);
        }
    }
    out
}

/// Peers in order of first appearance.
fn peer_names(records: &[Record]) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for r in records {
        if r.server != BASELINE && !names.contains(&r.server.as_str()) {
            names.push(&r.server);
        }
    }
    names
}

/// 1234567.8 -> "1,234,568".
pub fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v.abs());
    let mut out = String::new();
    if v < 0.0 && s != "0" {
        out.push('-');
    }
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

fn latency(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.1}")
    } else {
        thousands(v)
    }
}

/// `a / b` as "1.23x", or "-" when either is missing or b is zero.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// Markdown cell text: pipes escaped, one line.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The markdown report: `preamble` (machine, mode, commands), then one table per
/// scenario family.
pub fn table(records: &[Record], preamble: &str) -> String {
    let mut md = String::new();
    md.push_str(preamble.trim_end());
    md.push_str("\n\n");
    let rows = rows(records);
    let traffic: Vec<&Row<'_>> = rows.iter().filter(|r| r.scenario != "idle").collect();
    let idle: Vec<&Row<'_>> = rows.iter().filter(|r| r.scenario == "idle").collect();
    if !traffic.is_empty() {
        md.push_str("## Throughput and latency\n\n");
        md.push_str("Rate: median of the windows. Server CPU: user + system time of all the server's processes per operation; kernel: the system time's share of it (sockets, TCP, the loopback delivery of what the server sends), which no user-space change lowers. Busy: CPU seconds per wall second over the windows (1.00 = one core saturated); others: what the rest of the machine used meanwhile (well above 0: a busy machine, figures are low and noisy). Ratios compare with syncgate in the same row: rate syncgate/peer (above 1: syncgate faster), CPU per operation syncgate/peer (below 1: syncgate cheaper).\n\n");
        md.push_str("| scenario | server | rate | unit | p50 us | p99 us | p99.9 us | server CPU us/op | kernel | server busy | client busy | others busy | rate syncgate/peer | CPU/op syncgate/peer | note |\n");
        md.push_str("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for row in &traffic {
            let servers = row.baseline.into_iter().chain(row.peers.iter().copied());
            for r in servers {
                let is_base = r.server == BASELINE;
                let (rate_ratio, cpu_ratio) = match (is_base, row.baseline) {
                    (false, Some(b)) if b.error.is_none() && r.error.is_none() => (
                        ratio(b.rate, r.rate),
                        ratio(b.server_cpu_us_per_op, r.server_cpu_us_per_op),
                    ),
                    _ => ("-".into(), "-".into()),
                };
                let _ = match &r.error {
                    Some(e) => writeln!(
                        md,
                        "| {} | {} | failed: {} | | | | | | | | | | | | {} |",
                        row.title(),
                        r.server,
                        cell(e),
                        cell(r.note.as_deref().unwrap_or(""))
                    ),
                    None => writeln!(
                        md,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        row.title(),
                        r.server,
                        opt(r.rate, thousands),
                        r.unit,
                        opt(r.p50_us, latency),
                        opt(r.p99_us, latency),
                        opt(r.p999_us, latency),
                        opt(r.server_cpu_us_per_op, |v| format!("{v:.2}")),
                        opt(r.server_kernel_share, |v| format!("{:.0}%", v * 100.0)),
                        opt(r.server_cpu_util, |v| format!("{v:.2}")),
                        opt(r.client_cpu_util, |v| format!("{v:.2}")),
                        opt(r.other_cpu_util, |v| format!("{v:.2}")),
                        rate_ratio,
                        cpu_ratio,
                        cell(r.note.as_deref().unwrap_or(""))
                    ),
                };
            }
            if row.baseline.is_none() {
                let _ = writeln!(
                    md,
                    "| {} | syncgate | not run | | | | | | | | | | | | |",
                    row.title()
                );
            }
        }
        md.push('\n');
    }
    let split: Vec<&Record> = traffic
        .iter()
        .flat_map(|row| row.baseline.into_iter().chain(row.peers.iter().copied()))
        .filter(|r| r.error.is_none() && !r.server_threads.is_empty())
        .collect();
    if !split.is_empty() {
        md.push_str("## Server CPU by thread\n\n");
        md.push_str("The server CPU per operation of the table above, by thread, user + system µs (a process's main thread under its role: `worker`, `listener`, `main`; other threads under their names, numbers as `N`), and the context switches of all of them per operation: voluntary (a thread went to sleep) + involuntary (the scheduler took its CPU).\n\n");
        md.push_str("| scenario | server | by thread, user+system us/op | context switches/op |\n");
        md.push_str("|---|---|---|---:|\n");
        for r in split {
            let switches = r.server_switches.map_or("-".into(), |s| {
                format!("{:.2}+{:.2}", s.voluntary_per_op, s.involuntary_per_op)
            });
            let title = format!("{} {}", r.scenario, r.variant);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {switches} |",
                cell(&title),
                r.server,
                r.server_threads_line()
            );
        }
        md.push('\n');
    }
    if !idle.is_empty() {
        md.push_str("## Memory per idle connection\n\n");
        md.push_str("Server RSS: growth of the resident memory of all the server's processes, divided by the connections. Kernel TCP buffers: growth of `mem` in /proc/net/sockstat (both ends of each loopback connection) per connection; idle sockets hold no buffers, so it is about zero and moves with whatever else the machine does. Kernel slab: growth of `Slab` in /proc/meminfo per connection (socket, inode, file and epoll structures of both ends; also noisy on a busy machine). Ratio: server RSS syncgate/peer (below 1: syncgate smaller). syncgate live heap: growth of its `syncgate_heap_bytes` (all processes) per connection, what its data takes whatever pages the allocator keeps; the peers have no such gauge.\n\n");
        md.push_str("| connections | server | server RSS B/conn | syncgate live heap B/conn | kernel TCP buffers B/conn | kernel slab B/conn | RSS syncgate/peer | note |\n");
        md.push_str("|---|---|---:|---:|---:|---:|---:|---|\n");
        for row in idle {
            for r in row.baseline.into_iter().chain(row.peers.iter().copied()) {
                let rss_ratio = match row.baseline {
                    Some(b) if r.server != BASELINE && b.error.is_none() && r.error.is_none() => {
                        ratio(b.rss_per_conn, r.rss_per_conn)
                    }
                    _ => "-".into(),
                };
                let _ = match &r.error {
                    Some(e) => writeln!(
                        md,
                        "| {} | {} | failed: {} | | | | | |",
                        row.variant,
                        r.server,
                        cell(e)
                    ),
                    None => writeln!(
                        md,
                        "| {} | {} | {} | {} | {} | {} | {} | {} |",
                        row.variant,
                        r.server,
                        opt(r.rss_per_conn, thousands),
                        opt(r.heap_per_conn, thousands),
                        opt(r.kernel_per_conn, thousands),
                        opt(r.slab_per_conn, thousands),
                        rss_ratio,
                        cell(r.note.as_deref().unwrap_or(""))
                    ),
                };
            }
        }
        md.push('\n');
    }
    md
}

/// One bar of the chart.
struct Bar {
    /// Peer index, for the colour.
    peer: usize,
    /// syncgate / peer.
    value: f64,
}

/// One panel: a measure compared across rows.
struct Panel {
    /// What the panel compares, and which side is better.
    title: &'static str,
    /// (row title, bars); a row without bars says why.
    rows: Vec<(String, Vec<Bar>, Option<String>)>,
}

fn panels(records: &[Record]) -> Vec<Panel> {
    let names = peer_names(records);
    let rows = rows(records);
    let measure = |pick: &dyn Fn(&Record) -> Option<f64>, want_idle: bool| {
        let mut out = Vec::new();
        for row in rows.iter().filter(|r| (r.scenario == "idle") == want_idle) {
            let base = row.baseline.filter(|b| b.error.is_none()).and_then(pick);
            let bars: Vec<Bar> = row
                .peers
                .iter()
                .filter(|p| p.error.is_none())
                .filter_map(|p| {
                    let v = pick(p)?;
                    let b = base?;
                    (v > 0.0 && b > 0.0).then(|| Bar {
                        peer: names.iter().position(|n| *n == p.server).unwrap_or(0),
                        value: b / v,
                    })
                })
                .collect();
            let why = if bars.is_empty() {
                Some(match row.baseline {
                    None => "syncgate not run".to_string(),
                    Some(b) if b.error.is_some() => "syncgate failed".to_string(),
                    _ => "no comparable peer".to_string(),
                })
            } else {
                None
            };
            out.push((row.title(), bars, why));
        }
        out
    };
    vec![
        Panel {
            title: "Throughput, syncgate / peer (right of 1: syncgate faster)",
            rows: measure(&|r: &Record| r.rate, false),
        },
        Panel {
            title: "Server CPU per operation, syncgate / peer (left of 1: syncgate cheaper)",
            rows: measure(&|r: &Record| r.server_cpu_us_per_op, false),
        },
        Panel {
            title:
                "Server memory per idle connection, syncgate / peer (left of 1: syncgate smaller)",
            rows: measure(&|r: &Record| r.rss_per_conn, true),
        },
    ]
    .into_iter()
    .filter(|p| !p.rows.is_empty())
    .collect()
}

/// Escapes text for SVG.
fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The chart: one panel per measure, one group of bars per row, log2 axis around 1.
pub fn chart(records: &[Record]) -> String {
    const WIDTH: f64 = 960.0;
    const LABEL: f64 = 300.0; // label column
    const PLOT: f64 = WIDTH - LABEL - 70.0;
    const BAR: f64 = 11.0;
    const GAP: f64 = 7.0;
    // log2 range of the axis: 1/16x .. 16x; bars beyond are clipped and labelled.
    const SPAN: f64 = 4.0;
    let names = peer_names(records);
    let panels = panels(records);
    let x_of =
        |ratio: f64| LABEL + PLOT / 2.0 + ratio.log2().clamp(-SPAN, SPAN) / SPAN * (PLOT / 2.0);
    let mut body = String::new();
    let mut y = 40.0;
    // Legend.
    for (i, n) in names.iter().enumerate() {
        let x = LABEL + i as f64 * 150.0;
        let _ = write!(
            body,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">vs {}</text>"#,
            y - 10.0,
            COLOURS[i % COLOURS.len()],
            x + 16.0,
            y,
            xml(n)
        );
    }
    y += 20.0;
    for panel in &panels {
        let _ = write!(
            body,
            r#"<text x="10" y="{}" font-weight="bold">{}</text>"#,
            y + 14.0,
            xml(panel.title)
        );
        y += 28.0;
        let top = y;
        for (title, bars, why) in &panel.rows {
            let height = (bars.len().max(1) as f64) * BAR;
            let _ = write!(
                body,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LABEL - 8.0,
                y + height / 2.0 + 4.0,
                xml(title)
            );
            if let Some(why) = why {
                let _ = write!(
                    body,
                    r##"<text x="{}" y="{}" fill="#888">{}</text>"##,
                    LABEL + 8.0,
                    y + BAR - 2.0,
                    xml(why)
                );
            }
            for (i, bar) in bars.iter().enumerate() {
                let (x0, x1) = (x_of(1.0), x_of(bar.value));
                let by = y + i as f64 * BAR;
                let _ = write!(
                    body,
                    r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{:.2}x</title></rect><text x="{:.1}" y="{:.1}" font-size="9">{:.2}x</text>"#,
                    x0.min(x1),
                    by + 1.0,
                    (x1 - x0).abs().max(1.0),
                    BAR - 2.0,
                    COLOURS[bar.peer % COLOURS.len()],
                    bar.value,
                    x0.max(x1) + 3.0,
                    by + BAR - 2.0,
                    bar.value
                );
            }
            y += height + GAP;
        }
        // Axis: grid lines at powers of two, the 1x line darker.
        for k in -(SPAN as i32)..=(SPAN as i32) {
            let r = 2f64.powi(k);
            let x = x_of(r);
            let (stroke, w) = if k == 0 { ("#333", 1.5) } else { ("#ddd", 1.0) };
            let label = if k >= 0 { format!("{}x", r) } else { format!("1/{}x", 1 << -k) };
            let _ = write!(
                body,
                r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{stroke}" stroke-width="{w}"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="9">{label}</text>"#,
                top - 4.0,
                y,
                y + 11.0
            );
        }
        y += 30.0;
    }
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{:.0}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>{body}</svg>
"#,
        y + 10.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(server: &str, scenario: &str, rate: Option<f64>, error: Option<&str>) -> Record {
        Record {
            server: server.into(),
            scenario: scenario.into(),
            variant: "100 conns".into(),
            unit: "round trips/s".into(),
            rate,
            server_cpu_us_per_op: rate.map(|r| 1e6 / r),
            rss_per_conn: Some(if server == BASELINE { 1000.0 } else { 4000.0 }),
            error: error.map(str::to_string),
            ..Record::default()
        }
    }

    #[test]
    fn table_compares_each_peer_with_syncgate() {
        let records = [
            rec("syncgate", "ping", Some(200_000.0), None),
            rec("tokio-tungstenite", "ping", Some(100_000.0), None),
            rec("node-ws", "ping", None, Some("server closed | oops")),
            rec("syncgate", "idle", None, None),
            rec("node-ws", "idle", None, None),
        ];
        let md = table(&records, "# Title");
        assert!(md.starts_with("# Title\n"));
        assert!(md.contains("| ping 100 conns | syncgate | 200,000 |"), "{md}");
        let tung = md.lines().find(|l| l.contains("tokio-tungstenite")).unwrap();
        assert!(tung.contains("| 2.00x | 0.50x |"), "{tung}");
        assert!(md.contains("failed: server closed \\| oops"), "{md}");
        let idle = md.lines().find(|l| l.starts_with("| 100 conns | node-ws")).unwrap();
        assert!(idle.contains("| 4,000 |") && idle.contains("0.25x"), "{idle}");
        assert!(!md.contains("## Server CPU by thread"), "no record has a split: {md}");
    }

    #[test]
    fn the_split_by_thread_gets_a_table_of_its_own() {
        let mut split = rec("syncgate", "echo", Some(1000.0), None);
        split
            .server_threads
            .insert("worker".into(), ThreadCpu { user_us_per_op: 6.0, system_us_per_op: 4.9 });
        split.server_switches =
            Some(Switches { voluntary_per_op: 0.25, involuntary_per_op: 0.125 });
        let records = [split, rec("node-ws", "echo", Some(500.0), None)];
        let md = table(&records, "");
        let section = md.split("## Server CPU by thread").nth(1).expect("the section");
        assert!(
            section.contains("| echo 100 conns | syncgate | worker 6.0+4.9 | 0.25+0.12 |"),
            "{md}"
        );
        assert!(!section.contains("node-ws"), "a record without a split has no line: {md}");
    }

    #[test]
    fn rows_without_syncgate_say_so() {
        let records = [rec("node-ws", "echo", Some(5.0), None)];
        let md = table(&records, "");
        assert!(md.contains("| echo 100 conns | syncgate | not run |"), "{md}");
        let svg = chart(&records);
        assert!(svg.contains("syncgate not run"));
        let failed =
            [rec("syncgate", "echo", None, Some("x")), rec("node-ws", "echo", Some(5.0), None)];
        assert!(chart(&failed).contains("syncgate failed"));
    }

    #[test]
    fn chart_draws_one_bar_per_peer_and_measure() {
        let records = [
            rec("syncgate", "ping", Some(200_000.0), None),
            rec("a<b", "ping", Some(100_000.0), None),
            rec("c", "ping", Some(400_000.0), None),
        ];
        let svg = chart(&records);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("vs a&lt;b"), "names are escaped");
        // Throughput: 2x vs a<b, 0.5x vs c; CPU per op: 0.5x vs a<b, 2x vs c.
        assert_eq!(svg.matches("<title>2.00x</title>").count(), 2);
        assert_eq!(svg.matches("<title>0.50x</title>").count(), 2);
        assert_eq!(svg.matches("<rect x=").count(), 2 + 4, "two legend boxes, four bars");
        assert!(!svg.contains("Server memory per idle connection"), "no idle rows, no panel");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1234567.8), "1,234,568");
        assert_eq!(thousands(-1500.0), "-1,500");
    }
}
