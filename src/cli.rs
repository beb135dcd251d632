//! The command line: `serve`, `status`, `dead ...`, `mock-churnzero`, `demo`.
//! This is the binary's edge, so errors here are `anyhow`.

use crate::config::{LogFormat, ServeArgs};
use crate::outbox::{self, DeadListFilter, OutboxStatus};
use anyhow::{Context, bail};
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
    /// Measure raw SQLite, durable ingest, drain and status latency here.
    Bench(crate::bench::BenchArgs),
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// SQLite file holding the outbox.
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
    /// SQLite file holding the outbox.
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

/// Which dead events a replay or purge acts on.
#[derive(clap::Args, Debug, Clone)]
pub struct DeadSelection {
    /// Dead event ids.
    pub ids: Vec<i64>,
    /// Every dead event.
    #[arg(long, conflicts_with = "ids")]
    pub all: bool,
    /// Dead events that died at or after this time (RFC 3339).
    #[arg(long, conflicts_with_all = ["ids", "all"])]
    pub since: Option<String>,
    /// Dead events that died before this time (RFC 3339).
    #[arg(long, conflicts_with_all = ["ids", "all"])]
    pub until: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum DeadCommand {
    /// List dead events, oldest first.
    List {
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// Only reasons containing this text (case-insensitive).
        #[arg(long)]
        reason: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Start after this id (the previous page's last id).
        #[arg(long)]
        after: Option<i64>,
    },
    /// Show one dead event: the event, its attempts and the reason.
    Show { id: i64 },
    /// Send dead events again through the normal delivery path.
    Replay(DeadSelection),
    /// Delete dead events.
    Purge(DeadSelection),
}

/// Sets up tracing: `RUST_LOG` filters, `--log-format` chooses the shape.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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

fn time_or_dash(t: &Option<String>) -> &str {
    t.as_deref().unwrap_or("-")
}

/// The status as a readable table.
pub fn format_status(s: &OutboxStatus) -> String {
    let mut out = String::new();
    let row = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<28}{v}\n"));
    row(&mut out, "pending", s.pending.to_string());
    row(&mut out, "in flight", s.in_flight.to_string());
    row(&mut out, "held (identity)", s.held.to_string());
    row(&mut out, "delivered", s.delivered.to_string());
    row(&mut out, "dead", s.dead.to_string());
    row(&mut out, "accepted", s.accepted.to_string());
    row(&mut out, "filtered", s.filtered.to_string());
    row(&mut out, "duplicates", s.duplicates.to_string());
    row(&mut out, "retries", s.retries.to_string());
    row(
        &mut out,
        "oldest pending age",
        format!("{:.1}s", s.oldest_pending_age_seconds),
    );
    row(
        &mut out,
        "last delivery",
        time_or_dash(&s.last_delivery_at).to_string(),
    );
    row(
        &mut out,
        "last error",
        match (&s.last_error, &s.last_error_at) {
            (Some(e), Some(t)) => format!("{t} {e}"),
            (Some(e), None) => e.clone(),
            _ => "-".into(),
        },
    );
    row(
        &mut out,
        "sync last run",
        time_or_dash(&s.sync.last_run_at).to_string(),
    );
    row(
        &mut out,
        "sync next run",
        time_or_dash(&s.sync.next_run_at).to_string(),
    );
    row(
        &mut out,
        "sync pending contacts",
        s.sync.pending_contacts.to_string(),
    );
    row(
        &mut out,
        "sync last run sent/skipped",
        format!("{}/{}", s.sync.last_run_sent, s.sync.last_run_skipped),
    );
    out
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let reader = outbox::open_reader(&args.database).await?;
    let s = reader.status().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", format_status(&s));
    }
    Ok(())
}

fn parse_time(name: &str, v: &Option<String>) -> anyhow::Result<Option<i64>> {
    match v {
        None => Ok(None),
        Some(s) => crate::segment::parse_timestamp(&serde_json::Value::String(s.clone()))
            .map(|t| Some(t.timestamp_millis()))
            .with_context(|| format!("--{name} `{s}` is not an RFC 3339 timestamp")),
    }
}

async fn selected_ids(
    reader: &outbox::Reader,
    sel: &DeadSelection,
) -> anyhow::Result<Option<Vec<i64>>> {
    if sel.all {
        return Ok(None);
    }
    if !sel.ids.is_empty() {
        return Ok(Some(sel.ids.clone()));
    }
    if sel.since.is_some() || sel.until.is_some() {
        let f = DeadListFilter {
            since_ms: parse_time("since", &sel.since)?,
            until_ms: parse_time("until", &sel.until)?,
            ..Default::default()
        };
        return Ok(Some(reader.dead_ids(&f).await?));
    }
    bail!("say which dead events: IDs, --all, or --since/--until")
}

async fn dead(args: DeadArgs) -> anyhow::Result<()> {
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
            let items = reader.dead_list(&f).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else if items.is_empty() {
                println!("no dead events");
            } else {
                println!(
                    "{:<8} {:<24} {:<9} {:<20} reason",
                    "id", "died at", "type", "user"
                );
                for d in &items {
                    println!(
                        "{:<8} {:<24} {:<9} {:<20} {}",
                        d.id,
                        d.died_at.as_deref().unwrap_or("-"),
                        d.kind,
                        d.order_key,
                        d.reason
                    );
                }
                if items.len() as i64 == limit {
                    println!("more: --after {}", items.last().map(|d| d.id).unwrap_or(0));
                }
            }
        }
        DeadCommand::Show { id } => {
            let reader = outbox::open_reader(&args.database).await?;
            match reader.dead_show(id).await? {
                Some(d) => println!("{}", serde_json::to_string_pretty(&d)?),
                None => bail!("no dead event with id {id}"),
            }
        }
        DeadCommand::Replay(sel) => {
            let ob = outbox::open_cli_writer(&args.database, Default::default()).await?;
            let ids = selected_ids(&ob.reader, &sel).await?;
            let n = ob.writer.replay(ids).await?;
            println!("replayed {n} dead events; a running server delivers them");
        }
        DeadCommand::Purge(sel) => {
            let ob = outbox::open_cli_writer(&args.database, Default::default()).await?;
            let ids = selected_ids(&ob.reader, &sel).await?;
            let n = ob.writer.purge(ids).await?;
            println!("purged {n} dead events");
        }
    }
    Ok(())
}
