use std::process::ExitCode;

fn main() -> ExitCode {
    match churnzero_forwarder::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One readable line with its causes; no backtrace for an operator.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
