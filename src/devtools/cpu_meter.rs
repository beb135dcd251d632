//! CPU time on this machine during a bench phase, read from `/proc`, per
//! event. A rate says how far one machine went; CPU per event says how many
//! cores a target rate needs, where they went (the forwarder, the load
//! generator, the rest: a local database server and the kernel), and, with
//! how busy the machine was, whether the phase was bound by its CPUs or by
//! waiting (a disk's flush, a lock). On a system without `/proc` every
//! figure is absent rather than wrong.

use serde::{Deserialize, Serialize};

/// What one phase cost on this machine, in microseconds of CPU time per
/// event (or row, for the raw figures).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuCost {
    /// Every CPU of the machine: the load generator, the forwarders, a
    /// database server on this machine, the kernel, anything else running.
    pub machine_us_per_event: f64,
    /// The forwarder processes under test (on SQLite their storage
    /// included); absent for the raw figures, which run none.
    pub forwarder_us_per_event: Option<f64>,
    /// The bench process itself: the load generator, or the raw writer's
    /// client side (the whole raw SQLite writer, which runs in it).
    pub bench_us_per_event: f64,
    /// The machine's share that neither of the two above took: on a
    /// PostgreSQL run against a local server, mostly the server.
    pub rest_us_per_event: f64,
    /// Busy time over the phase's elapsed time, across every CPU (0 to 1).
    /// Near 1 the phase ran out of CPU; well below, it waited on something.
    pub machine_busy: f64,
}

/// Per-phase costs in a bench report (absent where `/proc` is not).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuReport {
    /// Raw inserts at 100 rows a transaction (PostgreSQL on a PostgreSQL
    /// run, SQLite with every index otherwise), per row.
    pub raw_100_per_tx: Option<CpuCost>,
    /// Raw inserts at one row a transaction, per row.
    pub raw_1_per_tx: Option<CpuCost>,
    pub batch_ingest: Option<CpuCost>,
    pub track_ingest_empty: Option<CpuCost>,
    pub drain: Option<CpuCost>,
}

/// The counters at a phase's start; [`CpuMeter::finish`] turns them into
/// a [`CpuCost`].
pub struct CpuMeter {
    machine: Option<Jiffies>,
    forwarders: Vec<(u32, u64)>,
    own: Option<u64>,
}

/// Busy and idle clock ticks summed over every CPU (`/proc/stat`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Jiffies {
    busy: u64,
    idle: u64,
}

impl CpuMeter {
    /// Starts metering, with `forwarders` the process ids under test.
    pub fn start(forwarders: &[u32]) -> CpuMeter {
        CpuMeter {
            machine: machine_jiffies(),
            forwarders: forwarders
                .iter()
                .filter_map(|&pid| Some((pid, process_ticks(&format!("/proc/{pid}/stat"))?)))
                .collect(),
            own: process_ticks("/proc/self/stat"),
        }
    }

    /// The cost of what happened since [`CpuMeter::start`], spread over
    /// `events`; `None` without `/proc` or without an event.
    pub fn finish(self, events: u64) -> Option<CpuCost> {
        let before = self.machine?;
        let after = machine_jiffies()?;
        let own = process_ticks("/proc/self/stat")?.saturating_sub(self.own?);
        if events == 0 {
            return None;
        }
        let busy = after.busy.saturating_sub(before.busy);
        let idle = after.idle.saturating_sub(before.idle);
        let forwarders = (!self.forwarders.is_empty()).then(|| {
            self.forwarders
                .iter()
                .map(|&(pid, start)| {
                    process_ticks(&format!("/proc/{pid}/stat"))
                        .unwrap_or(start)
                        .saturating_sub(start)
                })
                .sum::<u64>()
        });
        let per_event = |ticks: u64| ticks as f64 * 1e6 / ticks_per_second() / events as f64;
        let machine = per_event(busy);
        let forwarder = forwarders.map(per_event);
        let bench = per_event(own);
        Some(CpuCost {
            machine_us_per_event: machine,
            forwarder_us_per_event: forwarder,
            bench_us_per_event: bench,
            rest_us_per_event: (machine - forwarder.unwrap_or(0.0) - bench).max(0.0),
            machine_busy: if busy + idle == 0 {
                0.0
            } else {
                busy as f64 / (busy + idle) as f64
            },
        })
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn machine_jiffies() -> Option<Jiffies> {
    parse_machine(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The aggregate `cpu` line of `/proc/stat`: user nice system idle iowait
/// irq softirq steal. Idle and iowait are idle; the rest is busy (guest
/// time is already inside user).
fn parse_machine(stat: &str) -> Option<Jiffies> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(Jiffies {
        busy: at(0) + at(1) + at(2) + at(5) + at(6) + at(7),
        idle: at(3) + at(4),
    })
}

fn process_ticks(path: &str) -> Option<u64> {
    parse_process(&std::fs::read_to_string(path).ok()?)
}

/// User plus system ticks of a `/proc/<pid>/stat` line. The command name
/// is in parentheses and may hold spaces and parentheses itself, so the
/// fields are counted from the last `)`: utime and stime are the 14th and
/// 15th fields of the line, the 12th and 13th after the name.
fn parse_process(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_line_is_read_past_a_name_with_spaces_and_parentheses() {
        let line = "4242 (tokio rt) (x)) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    731 269 0 0 20 0 9 0 1234 100000 2000 18446744073709551615";
        assert_eq!(parse_process(line), Some(731 + 269));
        assert_eq!(parse_process("4242 (short) S 1 2"), None);
    }

    #[test]
    fn the_machine_line_splits_busy_from_idle() {
        let stat = "cpu  100 5 50 1000 20 3 7 2 0 0\ncpu0 50 2 25 500 10 1 3 1 0 0\n";
        assert_eq!(
            parse_machine(stat),
            Some(Jiffies {
                busy: 100 + 5 + 50 + 3 + 7 + 2,
                idle: 1000 + 20
            })
        );
    }

    /// This thread's CPU time, from the kernel's per-thread clock: a
    /// source independent of the tick counts the meter reads.
    fn thread_cpu() -> std::time::Duration {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    }

    #[test]
    fn this_process_spinning_shows_as_its_own_cost() {
        let meter = CpuMeter::start(&[]);
        let until = thread_cpu() + std::time::Duration::from_millis(300);
        let mut x = 0u64;
        while thread_cpu() < until {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let cost = meter.finish(1000).expect("Linux has /proc");
        // 300 ms of this thread's CPU over 1,000 events is at least 300 µs
        // each (other test threads of the process may add to it); the
        // ticks the meter reads are 10 ms, and the machine's figure holds
        // this process's.
        assert!(cost.bench_us_per_event >= 270.0, "{cost:?}");
        assert!(
            cost.machine_us_per_event >= cost.bench_us_per_event * 0.8,
            "{cost:?}"
        );
        assert_eq!(cost.forwarder_us_per_event, None);
        assert!(cost.machine_busy > 0.0 && cost.machine_busy <= 1.0);
    }
}
