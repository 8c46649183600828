//! The front-door report (`bench-report --front-door`): the same Zero workload straight to
//! zero-cache and through syncgate in front of it (scripts/bench-front-door.sh), summed up
//! as what the front door adds.
//!
//! Each round runs both paths **at the same time** (two load clients started together, the
//! same windows): zero-cache's latency drifts by tens of percent between runs made one after
//! the other (its JIT, caches and collector), far more than a front door adds, so only runs
//! that share its moments compare. A round is a pair of records, the direct one first.
//!
//! - Latency: each path's p50/p99/p99.9 per round; the report gives the median of the rounds
//!   per path, and the median of the per-round differences.
//! - CPU: syncgate's per relayed message is its CPU per operation (only the through-traffic
//!   crosses it) over the messages it relayed per operation (its own counters).
//!   zero-cache's per message is all its CPU in a round (both paths' traffic) over all the
//!   messages of the round, as the load clients counted them (a push and the poke's three).

use std::fmt::Write as _;

use crate::record::Record;
use crate::stats::median;

/// The record's server name for each path.
pub const DIRECT: &str = "zero-cache";
/// See [`DIRECT`].
pub const THROUGH: &str = "syncgate";

/// What the issue asks of the front door: under this much added p99 latency.
pub const P99_TARGET_PERCENT: f64 = 5.0;

/// One round: both paths measured at the same time.
#[derive(Debug, Clone, Copy)]
pub struct Round<'a> {
    pub direct: &'a Record,
    pub through: &'a Record,
}

impl Round<'_> {
    /// Both paths measured.
    fn ok(&self) -> bool {
        self.direct.error.is_none() && self.through.error.is_none()
    }

    /// Added latency at a percentile, percent of the direct path's.
    fn added(&self, at: fn(&Record) -> Option<f64>) -> Option<f64> {
        match (at(self.direct), at(self.through)) {
            (Some(d), Some(t)) if d > 0.0 => Some((t - d) * 100.0 / d),
            _ => None,
        }
    }

    /// Messages of both paths in the round, as the load clients counted them.
    fn messages(&self) -> Option<f64> {
        let of = |r: &Record| Some(r.messages_per_op? * r.ops? as f64);
        Some(of(self.direct)? + of(self.through)?)
    }

    /// CPU microseconds per message (both paths' traffic) of a process tree that served
    /// both: zero-cache (the direct record's server) or PostgreSQL (`--cpu-of postgres`).
    fn per_message(&self, name: &str) -> Option<f64> {
        let d = self.direct;
        let per_op =
            if name == DIRECT { d.server_cpu_us_per_op? } else { *d.cpu_us_per_op_of.get(name)? };
        Some(per_op * d.ops? as f64 / self.messages()?)
    }

    /// syncgate's CPU microseconds per message it relayed.
    fn syncgate_per_relayed(&self) -> Option<f64> {
        let t = self.through;
        let relayed = t.relayed_per_op.filter(|r| *r > 0.0)?;
        Some(t.server_cpu_us_per_op? / relayed)
    }
}

/// The rounds of a run: its front-door records paired in order (direct, through).
pub fn rounds(records: &[Record]) -> Result<Vec<Round<'_>>, String> {
    let mine: Vec<&Record> = records.iter().filter(|r| r.scenario == "front-door").collect();
    mine.chunks(2)
        .map(|pair| match pair {
            [d, t] if d.server == DIRECT && t.server == THROUGH => {
                Ok(Round { direct: d, through: t })
            }
            _ => Err(format!(
                "front-door records come in pairs ({DIRECT}, then {THROUGH}); got {:?}",
                pair.iter().map(|r| r.server.as_str()).collect::<Vec<_>>()
            )),
        })
        .collect()
}

/// The medians over the rounds that measured both paths.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Rounds that measured both paths.
    pub rounds: usize,
    /// Per path (direct, through): p50, p99, p99.9 in microseconds.
    pub direct: [Option<f64>; 3],
    pub through: [Option<f64>; 3],
    /// Median of the rounds' added latency, percent: p50, p99.
    pub added_p50_percent: Option<f64>,
    pub added_p99_percent: Option<f64>,
    /// CPU microseconds per message.
    pub syncgate_per_relayed_us: Option<f64>,
    pub zero_cache_per_message_us: Option<f64>,
    pub postgres_per_message_us: Option<f64>,
}

impl Summary {
    pub fn of(rounds: &[Round<'_>]) -> Summary {
        let ok: Vec<&Round<'_>> = rounds.iter().filter(|r| r.ok()).collect();
        let med = |f: &dyn Fn(&Round<'_>) -> Option<f64>| {
            median(&ok.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
        };
        let pcts = |direct: bool| {
            let at = |f: fn(&Record) -> Option<f64>| {
                med(&|r| f(if direct { r.direct } else { r.through }))
            };
            [at(|x| x.p50_us), at(|x| x.p99_us), at(|x| x.p999_us)]
        };
        Summary {
            rounds: ok.len(),
            direct: pcts(true),
            through: pcts(false),
            added_p50_percent: med(&|r| r.added(|x| x.p50_us)),
            added_p99_percent: med(&|r| r.added(|x| x.p99_us)),
            syncgate_per_relayed_us: med(&|r| r.syncgate_per_relayed()),
            zero_cache_per_message_us: med(&|r| r.per_message(DIRECT)),
            postgres_per_message_us: med(&|r| r.per_message("postgres")),
        }
    }

    /// The p99 target is met.
    pub fn p99_ok(&self) -> Option<bool> {
        self.added_p99_percent.map(|p| p < P99_TARGET_PERCENT)
    }

    /// syncgate spends less CPU per relayed message than zero-cache per message.
    pub fn cpu_ok(&self) -> Option<bool> {
        match (self.syncgate_per_relayed_us, self.zero_cache_per_message_us) {
            (Some(s), Some(z)) => Some(s < z),
            _ => None,
        }
    }
}

fn f(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn ms(v: Option<f64>) -> String {
    f(v.map(|us| us / 1000.0), 1)
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:+.1}%"))
}

fn verdict(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    }
}

/// The markdown report: `preamble`, the medians, what the front door adds, every round.
pub fn report(records: &[Record], preamble: &str) -> Result<String, String> {
    let rounds = rounds(records)?;
    let s = Summary::of(&rounds);
    let mut md = String::new();
    md.push_str(preamble.trim_end());
    let _ = write!(
        md,
        "\n\nBoth paths at the same time in each round; medians over the {} rounds that measured both.\n\n\
         | path | p50 ms | p99 ms | p99.9 ms |\n|---|---|---|---|\n\
         | straight to zero-cache | {} | {} | {} |\n| through syncgate | {} | {} | {} |\n",
        s.rounds,
        ms(s.direct[0]),
        ms(s.direct[1]),
        ms(s.direct[2]),
        ms(s.through[0]),
        ms(s.through[1]),
        ms(s.through[2]),
    );
    let ratio = match (s.syncgate_per_relayed_us, s.zero_cache_per_message_us) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.4}x", a / b),
        _ => "-".into(),
    };
    let _ = write!(
        md,
        "\n- Added latency through syncgate (median of the rounds' differences): p50 {}, p99 {} \
         (target: under +{P99_TARGET_PERCENT}% at p99: {}).\n\
         - CPU per message: syncgate {} us per relayed message; zero-cache {} us, PostgreSQL {} us \
         per message of all the traffic (target: syncgate's the smaller: {}; syncgate/zero-cache {ratio}).\n",
        pct(s.added_p50_percent),
        pct(s.added_p99_percent),
        verdict(s.p99_ok()),
        f(s.syncgate_per_relayed_us, 1),
        f(s.zero_cache_per_message_us, 0),
        f(s.postgres_per_message_us, 0),
        verdict(s.cpu_ok()),
    );
    md.push_str(
        "\nEvery round:\n\n| round | pushes/s direct / through | p50 ms direct / through | \
         p99 ms direct / through | added p99 | syncgate us/relayed msg | zero-cache us/msg | error |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (i, r) in rounds.iter().enumerate() {
        let errors: Vec<&str> =
            [r.direct, r.through].iter().filter_map(|x| x.error.as_deref()).collect();
        let _ = writeln!(
            md,
            "| {} | {} / {} | {} / {} | {} / {} | {} | {} | {} | {} |",
            i + 1,
            f(r.direct.rate, 1),
            f(r.through.rate, 1),
            ms(r.direct.p50_us),
            ms(r.through.p50_us),
            ms(r.direct.p99_us),
            ms(r.through.p99_us),
            pct(r.added(|x| x.p99_us)),
            f(r.syncgate_per_relayed(), 1),
            f(r.per_message(DIRECT), 0),
            errors.join("; ").replace('|', "\\|").replace('\n', " "),
        );
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(server: &str, p99: f64, cpu: f64, ops: u64, relayed: Option<f64>) -> Record {
        let mut r = Record {
            server: server.into(),
            scenario: "front-door".into(),
            p50_us: Some(p99 / 2.0),
            p99_us: Some(p99),
            server_cpu_us_per_op: Some(cpu),
            messages_per_op: Some(4.0),
            relayed_per_op: relayed,
            ops: Some(ops),
            ..Record::default()
        };
        r.cpu_us_per_op_of.insert("postgres".into(), 100.0);
        r
    }

    #[test]
    fn rounds_pair_the_paths_and_the_medians_resist_an_outlier() {
        let records = vec![
            rec(DIRECT, 10_000.0, 8000.0, 100, None),
            rec(THROUGH, 10_300.0, 40.0, 100, Some(4.0)),
            rec(DIRECT, 20_000.0, 8000.0, 100, None),
            rec(THROUGH, 20_200.0, 44.0, 100, Some(4.0)),
            rec(DIRECT, 10_000.0, 8000.0, 100, None),
            rec(THROUGH, 30_000.0, 48.0, 100, Some(4.0)),
        ];
        let rounds = rounds(&records).unwrap();
        assert_eq!(rounds.len(), 3);
        let s = Summary::of(&rounds);
        assert_eq!(s.rounds, 3);
        // +3%, +1%, +200%: the median is +3%.
        assert!((s.added_p99_percent.unwrap() - 3.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.p99_ok(), Some(true));
        assert_eq!(s.syncgate_per_relayed_us, Some(11.0));
        // 8000 us/op x 100 ops of zero-cache over 800 messages of both paths.
        assert_eq!(s.zero_cache_per_message_us, Some(1000.0));
        assert_eq!(s.postgres_per_message_us, Some(12.5));
        assert_eq!(s.cpu_ok(), Some(true));
        let md = report(&records, "# t").unwrap();
        assert!(md.contains("p99 +3.0% (target: under +5% at p99: met)"), "{md}");
        assert!(md.contains("syncgate 11.0 us per relayed message; zero-cache 1000 us"), "{md}");
    }

    #[test]
    fn a_failed_round_is_listed_and_left_out() {
        let mut bad = rec(THROUGH, 1.0, 1.0, 1, None);
        bad.error = Some("reply missing".into());
        let records = vec![rec(DIRECT, 10_000.0, 2000.0, 10, None), bad];
        let s = Summary::of(&rounds(&records).unwrap());
        assert_eq!((s.rounds, s.p99_ok(), s.cpu_ok()), (0, None, None));
        let md = report(&records, "# t").unwrap();
        assert!(md.contains("reply missing"), "{md}");
        assert!(md.contains("not measured"), "{md}");
    }

    #[test]
    fn slower_and_costlier_is_not_met_and_unpaired_records_are_an_error() {
        let records = vec![
            rec(DIRECT, 10_000.0, 100.0, 10, None),
            rec(THROUGH, 11_000.0, 500.0, 10, Some(4.0)),
        ];
        let s = Summary::of(&rounds(&records).unwrap());
        assert_eq!((s.p99_ok(), s.cpu_ok()), (Some(false), Some(false)));
        let unpaired = vec![rec(THROUGH, 1.0, 1.0, 1, None), rec(DIRECT, 1.0, 1.0, 1, None)];
        assert!(rounds(&unpaired).is_err());
    }
}
