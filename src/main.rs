use std::process::ExitCode;

/// The forwarder moves many short-lived strings and JSON values between
/// threads (request bodies, payloads, claimed batches). Under that load the
/// system allocator spent about half of a drain's CPU in malloc and free,
/// consolidating and unlinking chunks; mimalloc's thread-local free lists
/// make those calls cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    keep_transparent_huge_pages_off();
    match churnzero_forwarder::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One readable line with its causes; no backtrace for an operator.
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// mimalloc maps its memory in large aligned regions. Where the kernel backs
/// those with transparent huge pages (its `always` mode, or `madvise`, which
/// mimalloc asks for), a few touched bytes commit 2 MiB: a drain's peak RSS
/// rose from 62 to 103 MB when claims grew to eight requests' worth, at the
/// same speed. Memory the forwarder can promise matters more to whoever
/// sizes its container than fewer TLB misses, so the process opts out for
/// itself, before the runtime allocates much; the system setting is left
/// alone.
fn keep_transparent_huge_pages_off() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory
    // of this process; a kernel without it answers EINVAL, which changes
    // nothing and is ignored.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// The error and its causes on one line, each said once. Many error types
/// print their source inside their own message (`listening on ...: {source}`)
/// and report it as their source too; `{:#}` would then repeat it. A cause
/// whose text the line already ends with adds nothing and is left out.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !text.is_empty() && !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug, thiserror::Error)]
    #[error("listening on 127.0.0.1:1: {source}")]
    struct Listen {
        source: std::io::Error,
    }

    #[test]
    fn a_source_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let io_text = io.to_string();
        let e = anyhow::Error::new(Listen { source: io });
        assert_eq!(one_line(&e), format!("listening on 127.0.0.1:1: {io_text}"));
    }

    #[test]
    fn context_and_a_separate_cause_are_both_kept() {
        let e = anyhow::anyhow!("inner cause").context("outer step");
        assert_eq!(one_line(&e), "outer step: inner cause");
    }
}
