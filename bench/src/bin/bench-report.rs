//! `bench-report`: reads the JSON records of a benchmark run (one per line, as `loadgen
//! run --out` appends them) and writes `table.md` and `chart.svg` beside them.
//!
//! Usage: `bench-report RESULTS.jsonl [PREAMBLE.md]`; the preamble (machine, mode, how the
//! run was made) heads the table. `bench-report --front-door RESULTS.jsonl [PREAMBLE.md]`
//! writes `front-door.md` instead (scripts/bench-front-door.sh's report).

use std::path::Path;
use std::process::ExitCode;

use syncgate_bench::record::Record;
use syncgate_bench::{front_door, report};

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let front_door = args.first().is_some_and(|a| a == "--front-door");
    if front_door {
        args.remove(0);
    }
    let Some(input) = args.first() else {
        eprintln!("usage: bench-report [--front-door] RESULTS.jsonl [PREAMBLE.md]");
        return ExitCode::FAILURE;
    };
    match run(Path::new(input), args.get(1).map(Path::new), front_door) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-report: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(input: &Path, preamble: Option<&Path>, front_door: bool) -> Result<(), String> {
    let text = std::fs::read_to_string(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let records = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str::<Record>(l)
                .map_err(|e| format!("{}:{}: {e}", input.display(), i + 1))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let preamble = match preamble {
        Some(p) => std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => "# syncgate benchmark".to_string(),
    };
    let dir = input.parent().unwrap_or(Path::new("."));
    if front_door {
        let out = dir.join("front-door.md");
        std::fs::write(&out, front_door::report(&records, &preamble)?)
            .map_err(|e| format!("{}: {e}", out.display()))?;
        eprintln!("wrote {}", out.display());
        return Ok(());
    }
    let md = report::table(&records, &preamble);
    std::fs::write(dir.join("table.md"), md).map_err(|e| format!("table.md: {e}"))?;
    std::fs::write(dir.join("chart.svg"), report::chart(&records))
        .map_err(|e| format!("chart.svg: {e}"))?;
    eprintln!("wrote {} and {}", dir.join("table.md").display(), dir.join("chart.svg").display());
    Ok(())
}
