//! The command line: `serve`, `status`, `dead ...`, `mock-churnzero`, `demo`.
//! This is the binary's edge, so errors here are `anyhow`.

use crate::config::{LogFormat, ServeArgs};
use crate::outbox::{self, DeadListFilter, OutboxStatus};
use anyhow::bail;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Segment-compatible event forwarder for ChurnZero with a durable outbox.
#[derive(Parser, Debug)]
#[command(name = "churnzero-forwarder", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Ingest endpoint, delivery workers and operator endpoints.
    Serve(Box<ServeArgs>),
    /// Print the outbox's state, without a running server.
    Status(StatusArgs),
    /// Inspect and act on dead events, offline.
    Dead(DeadArgs),
    /// A stand-in ChurnZero HTTP API with fault injection.
    MockChurnzero(crate::mock_churnzero::MockArgs),
    /// serve + mock-churnzero + sample traffic, then the final status.
    Demo(crate::demo::DemoArgs),
    /// Measure raw storage (SQLite or PostgreSQL), durable ingest, drain and status latency here.
    Bench(crate::bench::BenchArgs),
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The outbox: a SQLite file, or a `postgres://` URL that several instances share.
    #[arg(
        long,
        env = "FORWARDER_DATABASE",
        default_value = "./churnzero-forwarder.db"
    )]
    pub database: PathBuf,
    /// The same fields as `GET /status`, as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct DeadArgs {
    /// The outbox: a SQLite file, or a `postgres://` URL that several instances share.
    #[arg(
        long,
        env = "FORWARDER_DATABASE",
        default_value = "./churnzero-forwarder.db",
        global = true
    )]
    pub database: PathBuf,
    /// JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: DeadCommand,
}

/// Which dead events a replay or purge acts on: ids, everything, or a
/// range of death times optionally narrowed by reason text.
#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("which").required(true).multiple(true)
    .args(["ids", "all", "since", "until", "reason"])))]
pub struct DeadSelection {
    /// Dead event ids (all must be dead events, else nothing changes).
    #[arg(value_name = "ID")]
    pub ids: Vec<i64>,
    /// Every dead event.
    #[arg(long, conflicts_with_all = ["ids", "since", "until", "reason"])]
    pub all: bool,
    /// Dead events that died at or after this time (RFC 3339, or an age such as `2h`).
    #[arg(long, conflicts_with = "ids")]
    pub since: Option<String>,
    /// Dead events that died before this time (RFC 3339, or an age such as `30m`).
    #[arg(long, conflicts_with = "ids")]
    pub until: Option<String>,
    /// Dead events whose reason contains this text (case-insensitive).
    #[arg(long, conflicts_with = "ids")]
    pub reason: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum DeadCommand {
    /// List dead events, oldest first, a page at a time.
    List {
        /// Died at or after this time (RFC 3339, or an age such as `2h`).
        #[arg(long)]
        since: Option<String>,
        /// Died before this time (RFC 3339, or an age such as `30m`).
        #[arg(long)]
        until: Option<String>,
        /// Only reasons containing this text (case-insensitive).
        #[arg(long)]
        reason: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        /// Start after this id (the previous page's last id).
        #[arg(long)]
        after: Option<i64>,
    },
    /// Show one dead event: the event, its attempts and the reason.
    Show { id: i64 },
    /// Send dead events again through the normal delivery path (a running
    /// server picks them up; they keep their payload and ordering key).
    Replay(DeadSelection),
    /// Delete dead events for good.
    Purge(DeadSelection),
}

/// Sets up tracing: `RUST_LOG` filters, `--log-format` chooses the shape.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli))
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            init_logging(args.log_format);
            let settings = args.validate()?;
            crate::server::run(settings).await?;
            Ok(())
        }
        Command::Status(args) => status(args).await,
        Command::Dead(args) => dead(args).await,
        Command::MockChurnzero(args) => {
            init_logging(LogFormat::Text);
            crate::mock_churnzero::run(args).await
        }
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Bench(args) => {
            init_logging(LogFormat::Text);
            crate::bench::run(args).await
        }
    }
}

/// Numbers as operators read them in a table: `12 345`.
fn count(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// `95s` -> `1m 35s`: ages at a glance.
fn age(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{:.1}s", seconds.max(0.0)),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A time with how long ago (or how far ahead) it is from `now`.
fn when(t: &Option<String>, now: chrono::DateTime<chrono::Utc>) -> String {
    let Some(text) = t else {
        return "-".into();
    };
    match chrono::DateTime::parse_from_rfc3339(text) {
        Ok(at) => {
            let d = (now - at.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0;
            if d >= 0.0 {
                format!("{text} ({} ago)", age(d))
            } else {
                format!("{text} (in {})", age(-d))
            }
        }
        Err(_) => text.clone(),
    }
}

/// One line of bars for a per-minute series, scaled to its own maximum.
fn sparkline(values: impl Iterator<Item = i64> + Clone) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.clone().max().unwrap_or(0);
    values
        .map(|v| {
            if v <= 0 || max == 0 {
                ' '
            } else {
                BARS[((v * 7 + max - 1) / max).clamp(0, 7) as usize]
            }
        })
        .collect()
}

/// The status as a readable table (`status` without `--json`).
pub fn format_status(s: &OutboxStatus) -> String {
    use std::fmt::Write;
    let now = chrono::DateTime::parse_from_rfc3339(&s.generated_at)
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|_| chrono::Utc::now());
    let mut o = String::new();
    let _ = writeln!(o, "churnzero-forwarder outbox at {}", s.generated_at);
    let _ = writeln!(o);
    let _ = writeln!(o, "EVENTS");
    let pending_note = if s.pending + s.in_flight > 0 {
        format!("oldest {}", age(s.oldest_pending_age_seconds))
    } else {
        String::new()
    };
    let held_note = if s.held > 0 && s.held_queued > 0 {
        format!(
            "oldest {}, waiting for identity ({} queued behind)",
            age(s.oldest_held_age_seconds),
            count(s.held_queued)
        )
    } else if s.held > 0 {
        format!(
            "oldest {}, waiting for identity",
            age(s.oldest_held_age_seconds)
        )
    } else {
        String::new()
    };
    let rows = [
        ("pending", s.pending, pending_note),
        ("in flight", s.in_flight, String::new()),
        ("held", s.held, held_note),
        (
            "delivered",
            s.delivered,
            format!("last {}", when(&s.last_delivery_at, now)),
        ),
        (
            "dead",
            s.dead,
            if s.dead > 0 {
                "see `dead list`".to_string()
            } else {
                String::new()
            },
        ),
    ];
    for (name, n, note) in rows {
        let line = format!("  {name:<12}{:>12}   {note}", count(n));
        let _ = writeln!(o, "{}", line.trim_end());
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "TOTALS");
    let _ = writeln!(
        o,
        "  accepted {}   filtered {}   duplicates {}   retries {}",
        count(s.accepted),
        count(s.filtered),
        count(s.duplicates),
        count(s.retries)
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "LAST HOUR (per minute, oldest left)");
    let series = |f: fn(&crate::outbox::MinuteStat) -> i64| {
        let values = s.per_minute.iter().map(f);
        (sparkline(values.clone()), values.sum::<i64>())
    };
    for (name, f) in [
        (
            "accepted",
            (|m| m.accepted) as fn(&crate::outbox::MinuteStat) -> i64,
        ),
        ("delivered", |m| m.delivered),
        ("failed", |m| m.failed),
    ] {
        let (line, total) = series(f);
        let _ = writeln!(o, "  {name:<10}{:>8}  |{line}|", count(total));
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "RECENT ERRORS");
    if s.recent_errors.is_empty() {
        let _ = writeln!(o, "  none");
    }
    for e in &s.recent_errors {
        let _ = writeln!(
            o,
            "  {}  {:<5} {:>6} event{}  {}",
            e.at,
            e.outcome,
            count(e.events),
            if e.events == 1 { " " } else { "s" },
            e.error
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "AUDIENCE SYNC");
    let _ = writeln!(o, "  last run          {}", when(&s.sync.last_run_at, now));
    let _ = writeln!(o, "  next run          {}", when(&s.sync.next_run_at, now));
    let _ = writeln!(o, "  pending contacts  {}", count(s.sync.pending_contacts));
    let _ = writeln!(
        o,
        "  last result       {} sent, {} skipped as unchanged",
        count(s.sync.last_run_sent),
        count(s.sync.last_run_skipped)
    );
    o
}

fn require_database(path: &std::path::Path) -> anyhow::Result<()> {
    if crate::outbox::postgres_url(path).is_some() {
        // A server answers for a URL; connecting says whether it is there.
        return Ok(());
    }
    if !path.exists() {
        bail!(
            "no database at {} (set --database or FORWARDER_DATABASE)",
            crate::outbox::display_database(path)
        );
    }
    Ok(())
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    require_database(&args.database)?;
    let reader = outbox::open_reader(&args.database).await?;
    let s = reader.status().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", format_status(&s));
    }
    Ok(())
}

/// RFC 3339, or an age (`2h`) meaning that long before now.
fn parse_time(name: &str, v: &Option<String>) -> anyhow::Result<Option<i64>> {
    let Some(s) = v else {
        return Ok(None);
    };
    if let Some(t) = crate::segment::parse_timestamp(&serde_json::Value::String(s.clone())) {
        return Ok(Some(t.timestamp_millis()));
    }
    if let Ok(d) = crate::config::parse_duration(s) {
        return Ok(Some(outbox::now_ms() - d.as_millis() as i64));
    }
    bail!("--{name} `{s}` is neither an RFC 3339 time nor an age such as `2h`")
}

/// What a selection names. Explicit ids must all be dead events: otherwise
/// nothing is changed. `--all` and ranges are matched chunk by chunk as
/// the writer goes, never read whole.
async fn selected(
    reader: &outbox::OutboxReader,
    sel: &DeadSelection,
) -> anyhow::Result<outbox::DeadSelection> {
    if sel.all {
        return Ok(outbox::DeadSelection::Matching(DeadListFilter::default()));
    }
    if !sel.ids.is_empty() {
        return match reader.dead_selection(&sel.ids).await? {
            Ok(ids) => Ok(outbox::DeadSelection::Ids(ids)),
            Err(reason) => bail!("{reason}"),
        };
    }
    Ok(outbox::DeadSelection::Matching(DeadListFilter {
        since_ms: parse_time("since", &sel.since)?,
        until_ms: parse_time("until", &sel.until)?,
        reason_contains: sel.reason.clone(),
        ..Default::default()
    }))
}

fn format_dead(d: &crate::outbox::DeadLetter) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let rows = [
        ("id", d.id.to_string()),
        ("message id", d.message_id.clone()),
        ("type", d.kind.clone()),
        ("user (order key)", d.order_key.clone()),
        ("accepted at", d.accepted_at.clone()),
        ("died at", d.died_at.clone().unwrap_or_else(|| "-".into())),
        ("attempts", d.attempts.to_string()),
        ("reason", d.reason.clone()),
    ];
    for (k, v) in rows {
        let _ = writeln!(o, "{k:<18}{v}");
    }
    let _ = writeln!(o, "\nATTEMPTS (oldest first)");
    match d.history.as_array() {
        Some(h) if !h.is_empty() => {
            for entry in h {
                let at = entry["at"].as_str().unwrap_or("-");
                let what = entry["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| entry.to_string());
                let _ = writeln!(o, "  {at}  {what}");
            }
        }
        _ => {
            let _ = writeln!(o, "  none recorded");
        }
    }
    let _ = writeln!(o, "\nEVENT (replayed as is)");
    let pretty = serde_json::to_string_pretty(&d.event).unwrap_or_default();
    for line in pretty.lines() {
        let _ = writeln!(o, "  {line}");
    }
    o
}

async fn dead(args: DeadArgs) -> anyhow::Result<()> {
    require_database(&args.database)?;
    match args.command {
        DeadCommand::List {
            since,
            until,
            reason,
            limit,
            after,
        } => {
            let reader = outbox::open_reader(&args.database).await?;
            let f = DeadListFilter {
                since_ms: parse_time("since", &since)?,
                until_ms: parse_time("until", &until)?,
                reason_contains: reason,
                after_id: after,
                limit,
            };
            let (items, next) = reader.dead_page(&f).await?;
            if args.json {
                let page = serde_json::json!({ "dead": items, "next_after": next });
                println!("{}", serde_json::to_string_pretty(&page)?);
            } else if items.is_empty() {
                println!("no dead events");
            } else {
                println!(
                    "{:>8}  {:<24}  {:<8}  {:<20}  {:>8}  reason",
                    "id", "died at", "type", "user", "attempts"
                );
                for d in &items {
                    println!(
                        "{:>8}  {:<24}  {:<8}  {:<20}  {:>8}  {}",
                        d.id,
                        d.died_at.as_deref().unwrap_or("-"),
                        d.kind,
                        d.order_key,
                        d.attempts,
                        d.reason
                    );
                }
                if let Some(n) = next {
                    println!("more: dead list --after {n}");
                }
            }
        }
        DeadCommand::Show { id } => {
            let reader = outbox::open_reader(&args.database).await?;
            match reader.dead_show(id).await? {
                Some(d) if args.json => println!("{}", serde_json::to_string_pretty(&d)?),
                Some(d) => print!("{}", format_dead(&d)),
                None => bail!("no dead event with id {id}"),
            }
        }
        DeadCommand::Replay(sel) => {
            let ob = outbox::open_cli_writer(&args.database, Default::default()).await?;
            let which = selected(&ob.reader(), &sel).await?;
            let n = ob.replay_selected(which).await?;
            if args.json {
                println!("{}", serde_json::json!({ "replayed": n }));
            } else {
                println!(
                    "replayed {n} dead event{}; a running server delivers {}",
                    if n == 1 { "" } else { "s" },
                    if n == 1 { "it" } else { "them" }
                );
            }
        }
        DeadCommand::Purge(sel) => {
            let ob = outbox::open_cli_writer(&args.database, Default::default()).await?;
            let which = selected(&ob.reader(), &sel).await?;
            let n = ob.purge_selected(which).await?;
            if args.json {
                println!("{}", serde_json::json!({ "purged": n }));
            } else {
                println!("purged {n} dead event{}", if n == 1 { "" } else { "s" });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_ages_read_well() {
        assert_eq!(count(0), "0");
        assert_eq!(count(1234567), "1 234 567");
        assert_eq!(count(-1000), "-1 000");
        assert_eq!(age(3.25), "3.2s");
        assert_eq!(age(95.0), "1m 35s");
        assert_eq!(age(7260.0), "2h 1m");
        assert_eq!(age(90000.0), "1d 1h");
    }

    #[test]
    fn sparkline_scales_to_its_maximum() {
        let line = sparkline([0, 1, 4, 8].into_iter());
        assert_eq!(line.chars().count(), 4);
        assert!(line.starts_with(' '));
        assert!(line.ends_with('█'));
    }

    #[test]
    fn selections_need_a_selector() {
        assert!(Cli::try_parse_from(["churnzero-forwarder", "dead", "replay"]).is_err());
        assert!(
            Cli::try_parse_from(["churnzero-forwarder", "dead", "replay", "--all", "3"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["churnzero-forwarder", "dead", "purge", "--since", "2h"]).is_ok()
        );
        assert!(
            Cli::try_parse_from([
                "churnzero-forwarder",
                "dead",
                "replay",
                "--since",
                "2h",
                "--until",
                "1h"
            ])
            .is_ok()
        );
    }
}
