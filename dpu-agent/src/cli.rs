//! The `dpu-agent` command line.

use clap::{Parser, Subcommand};
use std::fmt::Write as _;

/// DNE, the DPU network engine.
#[derive(Debug, Parser)]
#[command(name = "dpu-agent", version = version_line(), about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print every wire layout (sizes, alignments, field offsets, magics) and
    /// the layout hash. Builds for different machines (x86_64 host,
    /// aarch64 DPU) must print the same text to work together.
    Layout,
}

/// `--version` text: the crate version and the target triple, so an operator
/// can tell which build runs where.
pub fn version_line() -> &'static str {
    concat!(env!("CARGO_PKG_VERSION"), " (", env!("DNE_TARGET"), ")")
}

/// Runs a parsed command; returns what to print.
pub fn run(cli: &Cli) -> anyhow::Result<String> {
    match cli.command {
        Command::Layout => {
            let mut out = String::new();
            writeln!(out, "# dpu-agent {} doca={}", version_line(), doca::BACKEND.as_str())?;
            wire::layout::write_layout_table(&mut out)?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_prints_the_wire_table() {
        let cli = Cli::try_parse_from(["dpu-agent", "layout"]).unwrap();
        let out = run(&cli).unwrap();
        assert!(out.contains("Descriptor "));
        assert!(out.trim_end().ends_with(&format!("layout_hash={:#018x}", wire::LAYOUT_HASH)));
    }

    #[test]
    fn unknown_commands_are_refused() {
        assert!(Cli::try_parse_from(["dpu-agent", "frobnicate"]).is_err());
        assert!(Cli::try_parse_from(["dpu-agent"]).is_err());
    }
}
