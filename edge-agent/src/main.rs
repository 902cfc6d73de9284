//! The `vaultik` command line. Exit codes: 0 success; 1 failure; 2 usage error;
//! 3 finished, but some files were skipped (backup) or are damaged (restore, fetch,
//! verify).

use std::process::ExitCode;

use clap::Parser;

mod cmd;

use cmd::args::Cli;
use edge_agent::restore::printable;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbose = cli.verbose;
    match cmd::run(cli) {
        Ok(code) => code,
        Err(e) => {
            edge_agent::progress::clear();
            // Messages can quote what a bucket writer or a storage server wrote.
            eprintln!("vaultik: {}", printable(&cmd::one_line(&e)));
            if verbose {
                for line in cmd::details(&e) {
                    eprintln!("  {}", printable(&line));
                }
            }
            ExitCode::FAILURE
        }
    }
}
