//! `serve` settings: every flag of the contract, each also read from its
//! environment variable, validated into [`Settings`] before anything starts.

use crate::secret::Secret;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Parses the human durations operators type (`250ms`, `30s`, `2h`, `1h 30m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("invalid duration `{text}`: {e}"))
}

/// Log output shape: text for people, json for log pipelines.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Flags of `serve`. Secrets are `Secret` so that `Debug` never prints them,
/// and `hide_env_values` keeps them out of `--help`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address the ingest and operator endpoints listen on.
    #[arg(long, env = "FORWARDER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// The outbox: a SQLite file, or a `postgres://` URL that several instances share.
    #[arg(
        long,
        env = "FORWARDER_DATABASE",
        default_value = "./churnzero-forwarder.db"
    )]
    pub database: PathBuf,

    /// Accepted Segment write keys (repeat the flag, or comma-separate in the variable).
    #[arg(
        long = "write-key",
        env = "FORWARDER_WRITE_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub write_keys: Vec<Secret>,

    /// Bearer token for the dead-letter API under /admin/, reads included (dead letters are
    /// personal data); without one that API is refused.
    #[arg(long, env = "FORWARDER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// ChurnZero base URL, e.g. https://acme.us1app.churnzero.net.
    #[arg(long, env = "CHURNZERO_URL")]
    pub churnzero_url: Option<String>,

    /// ChurnZero app key.
    #[arg(long, env = "CHURNZERO_APP_KEY", hide_env_values = true)]
    pub churnzero_app_key: Option<Secret>,

    /// Concurrent delivery requests; with --adaptive-concurrency, the most.
    #[arg(long, env = "FORWARDER_WORKERS", default_value_t = 4)]
    pub workers: usize,

    /// Adapt the requests in flight to ChurnZero's answers and round-trip
    /// times, up to --workers (`--adaptive-concurrency false`: always --workers).
    #[arg(long, env = "FORWARDER_ADAPTIVE_CONCURRENCY", default_value_t = true,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub adaptive_concurrency: bool,

    /// Hard cap on actions sent to ChurnZero per second, real-time and sync
    /// lane together, shared by the live instances; 0 is none.
    #[arg(long, env = "FORWARDER_MAX_ACTIONS_PER_SECOND", default_value_t = 0)]
    pub max_actions_per_second: u32,

    /// Maximum ChurnZero actions per request.
    #[arg(long, env = "FORWARDER_BATCH_SIZE", default_value_t = 100)]
    pub batch_size: usize,

    /// Longest wait before a partial batch is sent.
    #[arg(long, env = "FORWARDER_FLUSH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub flush_interval: Duration,

    /// Timeout of one ChurnZero request.
    #[arg(long, env = "FORWARDER_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// First retry delay.
    #[arg(long, env = "FORWARDER_RETRY_INITIAL", default_value = "1s", value_parser = parse_duration)]
    pub retry_initial: Duration,

    /// Cap on one retry delay.
    #[arg(long, env = "FORWARDER_RETRY_MAX", default_value = "5m", value_parser = parse_duration)]
    pub retry_max: Duration,

    /// How long an event is retried before it is dead.
    #[arg(long, env = "FORWARDER_RETRY_BUDGET", default_value = "4h", value_parser = parse_duration)]
    pub retry_budget: Duration,

    /// Audience sync period.
    #[arg(long, env = "FORWARDER_SYNC_INTERVAL", default_value = "2h", value_parser = parse_duration)]
    pub sync_interval: Duration,

    /// Pacing of the audience sync lane, in actions per minute.
    #[arg(long, env = "FORWARDER_SYNC_MAX_PER_MINUTE", default_value_t = 6000)]
    pub sync_max_per_minute: u32,

    /// How long a messageId is remembered for deduplication.
    #[arg(long, env = "FORWARDER_DEDUP_WINDOW", default_value = "24h", value_parser = parse_duration)]
    pub dedup_window: Duration,

    /// How long delivered events are kept.
    #[arg(long, env = "FORWARDER_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub retention: Duration,

    /// Undelivered events beyond which ingest answers 503.
    #[arg(long, env = "FORWARDER_MAX_BACKLOG", default_value_t = 10_000_000)]
    pub max_backlog: u64,

    /// TOML file that renames and routes fields.
    #[arg(long, env = "FORWARDER_MAPPING")]
    pub mapping: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "FORWARDER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    // --- Browser and mobile clients (the public endpoint) ---
    /// Origins browsers may send from, comma-separated, or `*`.
    #[arg(
        long,
        env = "FORWARDER_CORS_ORIGINS",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub cors_origins: Vec<String>,

    /// The address clients use (e.g. https://events.example.com), announced
    /// by the settings endpoint; without it, taken from each request.
    #[arg(long, env = "FORWARDER_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// CIDRs of proxies whose X-Forwarded-For/-Host/-Proto are believed.
    #[arg(long, env = "FORWARDER_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// Events per second per client address (with a 10-second burst); 0 is off.
    #[arg(long, env = "FORWARDER_CLIENT_RATE_LIMIT", default_value_t = 0)]
    pub client_rate_limit: u32,

    /// Accept and store only; deliver nothing. `bench` uses it to time
    /// ingest alone and to build a backlog.
    #[arg(long, hide = true)]
    pub no_delivery: bool,

    /// How often leases, held events, retention, dedup ids and free pages
    /// are looked after. Tests shorten it.
    #[arg(long, hide = true, env = "FORWARDER_MAINTENANCE_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub maintenance_interval: Duration,

    // Listener: connection and memory budgets, shutdown delay, TLS.
    /// Connections served at once [from the open-file limit, less room for
    /// the database and outgoing requests].
    #[arg(long, env = "FORWARDER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Open connections one client address may hold (0 = no cap).
    #[arg(
        long,
        env = "FORWARDER_MAX_CONNECTIONS_PER_CLIENT",
        default_value_t = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    )]
    pub max_connections_per_client: usize,

    /// Memory for request bodies in flight, all connections together
    /// (`128MB`, `512KB`, `1GB`; powers of 1024).
    #[arg(long, env = "FORWARDER_MAX_BODY_MEMORY", default_value = "128MB", value_parser = parse_size)]
    pub max_body_memory: u64,

    /// After SIGTERM, how long `/readyz` answers 503 while ingest still
    /// serves, before the listener closes.
    #[arg(long, env = "FORWARDER_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, env = "FORWARDER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "FORWARDER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// Default of `--max-connections-per-client`: far above what one library
/// instance opens (Segment's server libraries keep one or a few), far below
/// what exhausts the process.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 64;

/// Default of `--max-body-memory`.
pub const DEFAULT_MAX_BODY_MEMORY: u64 = 128 * 1024 * 1024;

/// Parses byte sizes as operators write them: `128MB`, `512KB`, `1GB`,
/// `4096` (KB, MB and GB are powers of 1024; `KiB` forms are accepted too).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size `{text}`: expected a number such as 128MB"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let factor: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("invalid size `{text}`: use B, KB, MB or GB")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("invalid size `{text}`: too large"))
}

/// What the listener may spend and how it stops, and whether it speaks TLS.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    /// `None`: derived from the open-file limit at start.
    pub max_connections: Option<usize>,
    /// 0: no cap.
    pub max_connections_per_client: usize,
    pub max_body_memory: u64,
    pub shutdown_delay: Duration,
    pub tls: Option<TlsFiles>,
}

impl Default for ListenerSettings {
    fn default() -> ListenerSettings {
        ListenerSettings {
            max_connections: None,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            max_body_memory: DEFAULT_MAX_BODY_MEMORY,
            shutdown_delay: Duration::ZERO,
            tls: None,
        }
    }
}

/// The PEM files of `--tls-cert` and `--tls-key`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Validated serve settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub database: PathBuf,
    pub write_keys: Vec<Secret>,
    pub admin_token: Option<Secret>,
    pub churnzero_url: String,
    pub churnzero_app_key: Secret,
    pub workers: usize,
    /// `--adaptive-concurrency`.
    pub adaptive_concurrency: bool,
    /// `--max-actions-per-second`; 0: none.
    pub max_actions_per_second: u32,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub request_timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub retry_budget: Duration,
    pub sync_interval: Duration,
    pub sync_max_per_minute: u32,
    pub dedup_window: Duration,
    pub retention: Duration,
    pub max_backlog: u64,
    pub mapping: Option<PathBuf>,
    pub log_format: LogFormat,
    /// False only for `bench`'s ingest phases.
    pub deliver: bool,
    pub maintenance_interval: Duration,
    /// CORS, public address, trusted proxies, per-client rate limit.
    pub clients: crate::ingest::ClientSettings,
    pub listener: ListenerSettings,
}

/// A setting that is missing or out of range, named by flag and variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("missing required setting: {flag} (or the {env} environment variable)")]
    Missing {
        flag: &'static str,
        env: &'static str,
    },
    #[error("invalid setting {flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
}

impl ServeArgs {
    /// Checks required settings and ranges; names both the flag and the
    /// variable so an operator knows what to set in either world.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let listener = self.listener_settings()?;
        let write_keys: Vec<Secret> = self
            .write_keys
            .into_iter()
            .filter(|k| !k.is_empty())
            .collect();
        if write_keys.is_empty() {
            return Err(ConfigError::Missing {
                flag: "--write-key",
                env: "FORWARDER_WRITE_KEYS",
            });
        }
        let churnzero_url =
            self.churnzero_url
                .filter(|u| !u.trim().is_empty())
                .ok_or(ConfigError::Missing {
                    flag: "--churnzero-url",
                    env: "CHURNZERO_URL",
                })?;
        let url = churnzero_url.trim().trim_end_matches('/').to_string();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                flag: "--churnzero-url",
                reason: "must start with http:// or https://".into(),
            });
        }
        let churnzero_app_key =
            self.churnzero_app_key
                .filter(|k| !k.is_empty())
                .ok_or(ConfigError::Missing {
                    flag: "--churnzero-app-key",
                    env: "CHURNZERO_APP_KEY",
                })?;
        if self.workers == 0 {
            return Err(ConfigError::Invalid {
                flag: "--workers",
                reason: "must be at least 1".into(),
            });
        }
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return Err(ConfigError::Invalid {
                flag: "--batch-size",
                reason: "must be between 1 and 10000".into(),
            });
        }
        if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            return Err(ConfigError::Invalid {
                flag: "--retry-max",
                reason: "must be at least --retry-initial, which must be above zero".into(),
            });
        }
        if self.sync_interval.is_zero() {
            return Err(ConfigError::Invalid {
                flag: "--sync-interval",
                reason: "must be above zero".into(),
            });
        }
        if self.sync_max_per_minute == 0 {
            return Err(ConfigError::Invalid {
                flag: "--sync-max-per-minute",
                reason: "must be at least 1".into(),
            });
        }
        let clients = crate::ingest::ClientSettings {
            cors_origins: crate::ingest::cors::CorsOrigins::parse(&self.cors_origins).map_err(
                |reason| ConfigError::Invalid {
                    flag: "--cors-origins",
                    reason,
                },
            )?,
            public_url: self
                .public_url
                .as_deref()
                .filter(|u| !u.trim().is_empty())
                .map(crate::ingest::settings::PublicUrl::parse)
                .transpose()
                .map_err(|reason| ConfigError::Invalid {
                    flag: "--public-url",
                    reason,
                })?,
            trusted_proxies: crate::ingest::client_addr::TrustedProxies::parse(
                &self.trusted_proxies,
            )
            .map_err(|reason| ConfigError::Invalid {
                flag: "--trusted-proxies",
                reason,
            })?,
            client_rate_limit: self.client_rate_limit,
        };
        Ok(Settings {
            listen: self.listen,
            database: self.database,
            write_keys,
            admin_token: self.admin_token.filter(|t| !t.is_empty()),
            churnzero_url: url,
            churnzero_app_key,
            workers: self.workers,
            adaptive_concurrency: self.adaptive_concurrency,
            max_actions_per_second: self.max_actions_per_second,
            batch_size: self.batch_size,
            flush_interval: self.flush_interval,
            request_timeout: self.request_timeout,
            retry_initial: self.retry_initial,
            retry_max: self.retry_max,
            retry_budget: self.retry_budget,
            sync_interval: self.sync_interval,
            sync_max_per_minute: self.sync_max_per_minute,
            dedup_window: self.dedup_window,
            retention: self.retention,
            max_backlog: self.max_backlog,
            mapping: self.mapping,
            log_format: self.log_format,
            deliver: !self.no_delivery,
            maintenance_interval: self.maintenance_interval,
            clients,
            listener,
        })
    }

    fn listener_settings(&self) -> Result<ListenerSettings, ConfigError> {
        if self.max_connections == Some(0) {
            return Err(ConfigError::Invalid {
                flag: "--max-connections",
                reason: "must be at least 1".into(),
            });
        }
        if self.max_body_memory < crate::segment::LIMIT_REQUEST_BYTES as u64 {
            return Err(ConfigError::Invalid {
                flag: "--max-body-memory",
                reason: format!(
                    "must hold at least one request of the {} byte limit",
                    crate::segment::LIMIT_REQUEST_BYTES
                ),
            });
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (Some(_), None) => {
                return Err(ConfigError::Invalid {
                    flag: "--tls-cert",
                    reason: "needs --tls-key (FORWARDER_TLS_KEY) too: give both or neither".into(),
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    flag: "--tls-key",
                    reason: "needs --tls-cert (FORWARDER_TLS_CERT) too: give both or neither"
                        .into(),
                });
            }
        };
        Ok(ListenerSettings {
            max_connections: self.max_connections,
            max_connections_per_client: self.max_connections_per_client,
            max_body_memory: self.max_body_memory,
            shutdown_delay: self.shutdown_delay,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_human_forms() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn adaptive_concurrency_takes_a_bare_flag_or_a_value() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Probe {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let parse = |extra: &[&str]| {
            let args = ["probe"].iter().chain(extra).copied();
            Probe::try_parse_from(args).map(|p| p.serve.adaptive_concurrency)
        };
        assert!(parse(&[]).unwrap());
        assert!(parse(&["--adaptive-concurrency"]).unwrap());
        assert!(!parse(&["--adaptive-concurrency", "false"]).unwrap());
        assert!(!parse(&["--adaptive-concurrency=no"]).unwrap());
        assert!(parse(&["--adaptive-concurrency", "sometimes"]).is_err());
        let p = Probe::try_parse_from(["probe", "--max-actions-per-second", "1500"]).unwrap();
        assert_eq!(p.serve.max_actions_per_second, 1500);
    }

    #[test]
    fn sizes_take_operator_forms() {
        assert_eq!(parse_size("128MB").unwrap(), 128 << 20);
        assert_eq!(parse_size("512 KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("1gb").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999999999999GB").is_err());
    }
}
