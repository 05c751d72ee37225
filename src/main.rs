//! The `tern` binary: `tern serve` runs the server; `tern generate-config`
//! prints the commented default configuration; the other subcommands talk to
//! a running server (see `tern::cli`).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tern::cli;
use tern::config::{generate_config, Config, LogFormat, ServeArgs};
use tern::server::Server;

/// jemalloc for the whole process: the feature `unprefixed_malloc_…` makes
/// it RocksDB's `malloc` too (see Cargo.toml for the soak that chose it).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Make a CA and a server certificate signed by it, for trying TLS.
    GenCert(cli::GenCertArgs),
    /// Manage users (admin).
    User {
        #[command(flatten)]
        target: cli::Target,
        #[command(subcommand)]
        cmd: cli::UserCmd,
    },
    /// Manage groups (admin).
    Group {
        #[command(flatten)]
        target: cli::Target,
        #[command(subcommand)]
        cmd: cli::GroupCmd,
    },
    /// Send a message (as a user with --token, or --from through the admin API).
    Send {
        #[command(flatten)]
        target: cli::Target,
        #[command(flatten)]
        args: cli::SendArgs,
    },
    /// Print deliveries as JSON lines and ACK them.
    Listen {
        #[command(flatten)]
        target: cli::Target,
        #[command(flatten)]
        args: cli::ListenArgs,
    },
    /// Upload a file; prints its id and signed URL.
    Upload {
        #[command(flatten)]
        target: cli::Target,
        #[command(flatten)]
        args: cli::UploadArgs,
    },
    /// Download a file by id or URL.
    Download {
        #[command(flatten)]
        target: cli::Target,
        #[command(flatten)]
        args: cli::DownloadArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(&args),
        Command::GenerateConfig => {
            print!("{}", generate_config());
            Ok(())
        }
        Command::GenCert(args) => cli::gen_cert(&args),
        Command::User { target, cmd } => cli::user(&target, cmd),
        Command::Group { target, cmd } => cli::group(&target, cmd),
        Command::Send { target, args } => cli::send(&target, args),
        Command::Listen { target, args } => cli::listen(&target, args),
        Command::Upload { target, args } => cli::upload(&target, args),
        Command::Download { target, args } => cli::download(&target, args),
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
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let config = Config::load(args)?;
    init_tracing(&config)?;
    // jemalloc hands free pages back to the OS from threads of its own, on a
    // timer. Without them it purges only when something allocates, and an
    // idle server would keep what a burst left (docs/operations.md › Memory
    // bounds).
    match tikv_jemalloc_ctl::background_thread::write(true) {
        // glibc's heap holds next to nothing here: no malloc_trim when idle.
        Ok(_) => tern::store::set_trim_c_heap(false),
        Err(e) => tracing::warn!(error = %e, "jemalloc's background threads did not start"),
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing the SIGINT/SIGTERM/SIGHUP handlers")?;
    let server = Server::start(config)?;
    // One machine-readable line on stdout, for scripts and tests that start
    // the server on port 0 (and one per certificate reload).
    println!(
        "tern ready listen={} http_listen={}",
        server.listen, server.http_listen
    );
    for signal in signals.forever() {
        if signal != SIGHUP {
            break;
        }
        match server.reload_tls() {
            Ok(true) => {
                tracing::info!("SIGHUP: certificate reloaded; new connections use it");
                println!("tern tls-reloaded");
            }
            Ok(false) => tracing::info!("SIGHUP: nothing to reload (TLS is off)"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: certificate reload failed; the one in use stays");
                println!("tern tls-reload-failed");
            }
        }
    }
    server
        .shutdown()
        .context("the final flush failed (the WAL still holds everything acknowledged)")?;
    Ok(())
}

fn init_tracing(config: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .with_context(|| format!("log: invalid filter {:?}", config.log))?;
    // Colour only on a terminal: a log file or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Regression: `serve`'s `--data-dir` once clashed with the client
    /// commands' global `--data-dir`, and clap panicked at run time.
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
