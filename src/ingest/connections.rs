//! Who gets a connection. Every open connection costs a file descriptor and
//! some memory, and the process has a fixed number of descriptors: a client
//! that opens them faster than the header deadline closes them would
//! otherwise leave nothing for anyone else (accept fails with `EMFILE`, and
//! every other client times out). So:
//!
//! - all connections together stay under a budget (`--max-connections`),
//!   derived from the open-file limit with room left for the database and
//!   the requests to ChurnZero;
//! - one client address may hold at most `--max-connections-per-client`,
//!   except addresses the caller exempts (trusted proxies, which carry many
//!   clients on their connections);
//! - when the budget is nearly used, connections that are doing nothing
//!   (idle keep-alive, or still waiting for their request headers, as a
//!   slow-header client's do) are closed first, oldest first, to make room.
//!
//! A refused connection is closed at once after `accept`, so the listen
//! backlog keeps moving and a well-behaved client still gets in.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Decides whether a client address is exempt from the per-client cap (a
/// trusted proxy, say). Called only for an address that has reached the cap.
pub type Exempt = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// Descriptors kept out of the connection budget: the SQLite files and pool
/// connections, the ChurnZero client's connections, the listener, stdio and
/// the runtime's own.
pub const RESERVED_FILES: u64 = 128;

/// Beyond this many connections, memory (buffers, tasks) rather than the
/// open-file limit is what runs out: a default never goes above it.
pub const DEFAULT_MAX_CONNECTIONS_CAP: u64 = 65_536;

/// How the budget is shared.
#[derive(Clone)]
pub struct Limits {
    /// Connections open at once, all clients together.
    pub max: usize,
    /// Connections one client address may hold; 0 means no cap.
    pub per_client: usize,
    /// Addresses the per-client cap does not apply to.
    pub exempt: Option<Exempt>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("max", &self.max)
            .field("per_client", &self.per_client)
            .field("exempt", &self.exempt.is_some())
            .finish()
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address already holds its share.
    PerClient,
    /// Every connection is busy serving a request: nothing idle to close.
    Full,
}

/// The shared admission state of one listener.
#[derive(Clone)]
pub struct Connections {
    inner: Arc<Inner>,
}

struct Inner {
    limits: Limits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Admitted and not yet dropped, evicted ones included.
    open: usize,
    /// Evicted but not yet gone: they no longer count against the budget.
    evicting: usize,
    per_client: HashMap<IpAddr, usize>,
    records: HashMap<u64, Record>,
    /// Connections without a request in service, by the time they became
    /// idle: the first ones are closed first.
    idle: BTreeMap<(Instant, u64), ()>,
    next_id: u64,
    refused_since_warning: u64,
    last_warning: Option<Instant>,
}

struct Record {
    ip: IpAddr,
    active: usize,
    idle_since: Option<Instant>,
    evicted: bool,
    close: Arc<Notify>,
}

/// How often a refusal is reported at warn level (the rest are counted).
const WARN_EVERY: Duration = Duration::from_secs(10);

impl Connections {
    /// One per listener: the budget is shared by every connection it accepts.
    pub fn new(limits: Limits) -> Connections {
        Connections {
            inner: Arc::new(Inner {
                limits,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The limits in force, for the start-up log line.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Connections admitted and still open: what tests and a future gauge
    /// read.
    pub fn open(&self) -> usize {
        self.inner.state.lock().unwrap().open
    }

    /// Admits a connection from `ip`, closing the oldest idle one first when
    /// the budget is nearly used. The returned guard gives the place back
    /// when dropped.
    pub fn admit(&self, ip: IpAddr) -> Result<Admitted, Refusal> {
        let limits = &self.inner.limits;
        let mut st = self.inner.state.lock().unwrap();
        let from_ip = st.per_client.get(&ip).copied().unwrap_or(0);
        if limits.per_client > 0
            && from_ip >= limits.per_client
            && !limits.exempt.as_ref().is_some_and(|exempt| exempt(ip))
        {
            st.note_refusal(ip, Refusal::PerClient);
            return Err(Refusal::PerClient);
        }
        // Above seven eighths of the budget, each new connection closes the
        // connection that has been idle longest, so that idle ones give way
        // to new ones before the budget is gone.
        let high_water = limits.max - limits.max / 8;
        if st.open - st.evicting >= high_water {
            st.evict_oldest_idle();
        }
        if st.open - st.evicting >= limits.max {
            st.note_refusal(ip, Refusal::Full);
            return Err(Refusal::Full);
        }
        let id = st.next_id;
        st.next_id += 1;
        let now = Instant::now();
        let close = Arc::new(Notify::new());
        st.open += 1;
        *st.per_client.entry(ip).or_default() += 1;
        st.records.insert(
            id,
            Record {
                ip,
                active: 0,
                idle_since: Some(now),
                evicted: false,
                close: close.clone(),
            },
        );
        st.idle.insert((now, id), ());
        Ok(Admitted {
            connections: self.clone(),
            id,
            close,
        })
    }
}

impl State {
    fn evict_oldest_idle(&mut self) -> bool {
        let Some(((_, id), ())) = self.idle.pop_first() else {
            return false;
        };
        if let Some(record) = self.records.get_mut(&id) {
            record.idle_since = None;
            record.evicted = true;
            record.close.notify_one();
            self.evicting += 1;
            tracing::debug!(peer = %record.ip, "closing an idle connection to make room");
        }
        true
    }

    fn note_refusal(&mut self, ip: IpAddr, why: Refusal) {
        self.refused_since_warning += 1;
        let due = self.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if due {
            let reason = match why {
                Refusal::PerClient => "the address holds its share of connections",
                Refusal::Full => "every connection is busy",
            };
            tracing::warn!(
                peer = %ip,
                refused = self.refused_since_warning,
                open = self.open,
                "connections refused since the last report; latest: {reason}"
            );
            self.refused_since_warning = 0;
            self.last_warning = Some(Instant::now());
        }
    }
}

/// One admitted connection's place in the budget.
pub struct Admitted {
    connections: Connections,
    id: u64,
    close: Arc<Notify>,
}

impl Admitted {
    /// Resolves when the connection was chosen to be closed to make room.
    pub async fn evicted(&self) {
        self.close.notified().await
    }

    /// Marks a request in service until the guard is dropped: a connection
    /// serving a request is never closed to make room.
    pub fn busy(&self) -> Busy {
        let mut st = self.connections.inner.state.lock().unwrap();
        if let Some(record) = st.records.get_mut(&self.id) {
            record.active += 1;
            if let Some(since) = record.idle_since.take() {
                st.idle.remove(&(since, self.id));
            }
        }
        Busy {
            connections: self.connections.clone(),
            id: self.id,
        }
    }

    /// How long the connection has had no request in service (zero while
    /// it has one).
    pub fn idle_for(&self) -> Duration {
        let st = self.connections.inner.state.lock().unwrap();
        st.records
            .get(&self.id)
            .and_then(|r| r.idle_since)
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut st = self.connections.inner.state.lock().unwrap();
        if let Some(record) = st.records.remove(&self.id) {
            st.open -= 1;
            if record.evicted {
                st.evicting -= 1;
            }
            if let Some(since) = record.idle_since {
                st.idle.remove(&(since, self.id));
            }
            if let Some(n) = st.per_client.get_mut(&record.ip) {
                *n -= 1;
                if *n == 0 {
                    st.per_client.remove(&record.ip);
                }
            }
        }
    }
}

/// A request in service on a connection.
pub struct Busy {
    connections: Connections,
    id: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut st = self.connections.inner.state.lock().unwrap();
        let now = Instant::now();
        let mut became_idle = false;
        if let Some(record) = st.records.get_mut(&self.id) {
            record.active -= 1;
            if record.active == 0 && !record.evicted {
                record.idle_since = Some(now);
                became_idle = true;
            }
        }
        if became_idle {
            st.idle.insert((now, self.id), ());
        }
    }
}

/// The open-file limit at start and after raising it.
#[derive(Debug, Clone, Copy)]
pub struct FileLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft open-file limit to the hard one: the soft default (often
/// 1,024) is what a distribution sets for interactive shells, not what a
/// server needs, and only the soft limit counts.
#[cfg(unix)]
// rlim_t is u64 on Linux, not on every unix.
#[allow(clippy::unnecessary_cast)]
pub fn raise_open_file_limit() -> std::io::Result<FileLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass; nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let soft_before = lim.rlim_cur as u64;
    let hard = lim.rlim_max as u64;
    if lim.rlim_cur < lim.rlim_max {
        let mut wanted = lim.rlim_max;
        if wanted == libc::RLIM_INFINITY {
            // The kernel refuses an infinite soft limit for files; its own
            // ceiling is fs.nr_open.
            wanted = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(1_048_576);
        }
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = wanted;
    }
    Ok(FileLimit {
        soft_before,
        soft: lim.rlim_cur as u64,
        hard,
    })
}

#[cfg(not(unix))]
pub fn raise_open_file_limit() -> std::io::Result<FileLimit> {
    Err(std::io::Error::other("no open-file limit on this platform"))
}

/// The default of `--max-connections` for an open-file limit: what is
/// left after [`RESERVED_FILES`] and two descriptors per delivery worker (its
/// connection to ChurnZero and a pooled spare).
pub fn default_max_connections(open_files: u64, workers: usize) -> usize {
    let reserved = RESERVED_FILES + 2 * workers as u64;
    let room = if open_files > 2 * reserved {
        open_files - reserved
    } else {
        (open_files / 2).max(8)
    };
    room.min(DEFAULT_MAX_CONNECTIONS_CAP) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_address_gets_its_share_and_others_still_get_in() {
        let c = Connections::new(Limits {
            max: 100,
            per_client: 3,
            exempt: None,
        });
        let held: Vec<_> = (0..3).map(|_| c.admit(ip(2)).unwrap()).collect();
        assert_eq!(c.admit(ip(2)).err(), Some(Refusal::PerClient));
        let other = c.admit(ip(1)).unwrap();
        drop(held);
        assert_eq!(c.open(), 1);
        let _again = c.admit(ip(2)).unwrap();
        drop(other);
    }

    #[test]
    fn exempt_addresses_pass_the_per_client_cap() {
        let c = Connections::new(Limits {
            max: 100,
            per_client: 1,
            exempt: Some(Arc::new(|ip: IpAddr| ip == IpAddr::from([127, 0, 0, 9]))),
        });
        let _a = c.admit(ip(9)).unwrap();
        let _b = c.admit(ip(9)).unwrap();
        let _c = c.admit(ip(3)).unwrap();
        assert_eq!(c.admit(ip(3)).err(), Some(Refusal::PerClient));
    }

    #[tokio::test]
    async fn near_the_budget_the_oldest_idle_connection_makes_room_never_a_busy_one() {
        let c = Connections::new(Limits {
            max: 8,
            per_client: 0,
            exempt: None,
        });
        let conns: Vec<_> = (0..8).map(|_| c.admit(ip(1)).unwrap()).collect();
        // All but the first serve a request: the first is the only idle one.
        let _busy: Vec<_> = conns[1..].iter().map(Admitted::busy).collect();
        let newcomer = c.admit(ip(1)).unwrap();
        tokio::time::timeout(Duration::from_secs(1), conns[0].evicted())
            .await
            .expect("the idle connection is told to close");
        // Nothing idle left but the newcomer itself, which is now the
        // oldest idle one; with it busy, the budget is full.
        let _newcomer_busy = newcomer.busy();
        assert_eq!(c.admit(ip(1)).err(), Some(Refusal::Full));
        drop(conns);
        drop(_busy);
        assert_eq!(c.open(), 1);
    }

    #[test]
    fn defaults_leave_room_for_the_database_and_outgoing_requests() {
        assert_eq!(default_max_connections(1024, 4), 888);
        assert_eq!(default_max_connections(1024, 100), 696);
        assert_eq!(default_max_connections(100, 4), 50);
        assert_eq!(default_max_connections(10_000_000, 4), 65_536);
    }
}
