//! The `tern` binary: `tern serve` runs the server; `tern generate-config`
//! prints the commented default configuration.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tern::config::{generate_config, Config, LogFormat, ServeArgs};
use tern::server::Server;

/// tern: a self-hosted messaging server with exactly-once delivery.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (no configuration needed: data goes to ./tern-data).
    Serve(Box<ServeArgs>),
    /// Print the commented default configuration file.
    GenerateConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(&args),
        Command::GenerateConfig => {
            print!("{}", generate_config());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args)?;
    init_tracing(&config)?;
    let (stop_tx, stop_rx) = crossbeam::channel::bounded::<()>(1);
    ctrlc::set_handler(move || {
        let _ = stop_tx.try_send(());
    })
    .context("installing the SIGINT/SIGTERM handler")?;
    let server = Server::start(config)?;
    // One machine-readable line on stdout, for scripts and tests that start
    // the server on port 0.
    println!(
        "tern ready listen={} http_listen={}",
        server.listen, server.http_listen
    );
    let _ = stop_rx.recv();
    server.shutdown();
    Ok(())
}

fn init_tracing(config: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .with_context(|| format!("log: invalid filter {:?}", config.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}
