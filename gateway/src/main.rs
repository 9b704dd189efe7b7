//! The `switchboard` binary.

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = switchboard::tooling::cli::Cli::parse();
    // One crypto provider for every TLS user in the process (aws-lc-rs).
    switchboard::edge::tls::install_default_provider();
    let default_level = match cli.command {
        switchboard::tooling::cli::Command::Dev { .. } | switchboard::tooling::cli::Command::Serve { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)))
        .with_writer(std::io::stderr)
        .init();
    match switchboard::tooling::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
