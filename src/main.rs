//! The `sidebus` binary: `sidebus run` is the daemon; the other subcommands are admin tools that
//! talk to a running daemon through its socket.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Arg, ArgMatches, Parser, Subcommand};
use sidebus::config::{self, Config, EXIT_CONFIG, Sources};
use sidebus::front::{server, shutdown, telemetry};

mod cli;

#[derive(Parser)]
#[command(name = "sidebus", version, about = "A per-host sidecar event bus: publish and subscribe over a Unix socket")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    #[command(
        after_help = "Each option is also read from SIDEBUS_<KEY> and from the config file (lowest precedence).\n\nExample:\n  sidebus run --config /etc/sidebus/sidebus.toml --log-level sidebus=debug"
    )]
    Run(RunArgs),
    /// Publish events through the daemon.
    Publish(cli::publish::Args),
    /// Print a group's deliveries as JSON lines and ack them (or fail, dead-letter or peek).
    Tail(cli::tail::Args),
    /// Register, inspect and check event schemas.
    Schema(cli::schema::Args),
    /// Replay a type's events from the log to one consumer group.
    Replay(cli::replay::Args),
    /// List running replays, or cancel one.
    Replays(cli::replay::ListArgs),
    /// List, show, redrive or purge a group's dead letters.
    Dlq(cli::dlq::Args),
    /// List consumer groups, delete one, or move its read position.
    Groups(cli::groups::Args),
    /// Check the daemon and its Redis and Postgres: exit 0 when all are up.
    #[command(visible_alias = "health")]
    Ping(cli::ping::Args),
    /// Print the daemon's backends, counters, spool and groups.
    Stats(cli::stats::Args),
    /// A live view of the daemon: rates, lag, pending, dead letters, spool.
    Top(cli::stats::TopArgs),
}

/// `run`'s flags: `--config` and one per config key, generated from the key table so the two
/// cannot drift.
struct RunArgs {
    config: Option<PathBuf>,
    values: BTreeMap<String, String>,
}

impl clap::FromArgMatches for RunArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let values = config::SCALAR_KEYS.iter().filter_map(|(k, _)| m.get_one::<String>(k).map(|v| ((*k).to_owned(), v.clone()))).collect();
        Ok(RunArgs { config: m.get_one::<String>("config").map(PathBuf::from), values })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = RunArgs::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for RunArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let config = Arg::new("config").long("config").env("SIDEBUS_CONFIG").value_name("FILE").help("TOML config file");
        cmd.arg(config).args(
            config::SCALAR_KEYS
                .iter()
                // A secret's value from the environment never shows in --help.
                .map(|(k, help)| {
                    Arg::new(*k)
                        .long(k.replace('_', "-"))
                        .env(config::env_var(k))
                        .hide_env_values(config::secrets::is_secret(k))
                        .value_name("VALUE")
                        .help(*help)
                }),
        )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run_daemon(args),
        Command::Publish(args) => cli::block_on(cli::publish::run(args)),
        Command::Tail(args) => cli::block_on(cli::tail::run(args)),
        Command::Schema(args) => cli::block_on(cli::schema::run(args)),
        Command::Replay(args) => cli::block_on(cli::replay::run(args)),
        Command::Replays(args) => cli::block_on(cli::replay::list(args)),
        Command::Dlq(args) => cli::block_on(cli::dlq::run(args)),
        Command::Groups(args) => cli::block_on(cli::groups::run(args)),
        Command::Ping(args) => cli::block_on(cli::ping::run(args)),
        Command::Stats(args) => cli::block_on(cli::stats::run(args)),
        Command::Top(args) => cli::block_on(cli::stats::top(args)),
    }
}

fn run_daemon(args: RunArgs) -> ExitCode {
    // clap already read SIDEBUS_* into the flag values (flag first, then environment).
    // systemd's credentials (LoadCredential=) are found by key name in $CREDENTIALS_DIRECTORY.
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()).map(PathBuf::from);
    let sources = Sources { file: args.config, env: BTreeMap::new(), flags: args.values, credentials };
    let config = match Config::load(&sources).and_then(|c| sidebus::backend::check_urls(&c).map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sidebus: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    // The schemas of schemas_dir are part of the configuration: a bad file stops the start.
    let dir_schemas = match &config.schemas_dir {
        None => vec![],
        Some(dir) => match sidebus::bus::schema::read_dir(dir) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("sidebus: invalid config: {}: {e}", config::key::SCHEMAS_DIR);
                return ExitCode::from(EXIT_CONFIG as u8);
            }
        },
    };
    let filter = match telemetry::init(&config.log_level, config.log_format) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("sidebus: cannot start logging: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sidebus: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let access = config.access.clone();
        let reload = move || match Config::load(&sources) {
            Ok(c) => {
                access.replace_with(&c.access);
                match filter.set(&c.log_level) {
                    Ok(()) => tracing::info!(
                        log_level = %c.log_level,
                        "reloaded the log filter and the access list (other keys take effect at restart)"
                    ),
                    Err(e) => tracing::warn!(error = %e, "reloaded the access list; could not apply the log filter"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "config not reloaded"),
        };
        let shutdown = shutdown::listen(reload).map_err(|e| format!("cannot listen for signals: {e}"))?;
        server::run(config, dir_schemas, shutdown).await.map_err(|e| match e.hint() {
            Some(hint) => format!("{e}; {hint}"),
            None => e.to_string(),
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: the log goes to stderr already.
            tracing::error!("sidebus stopped: {e}");
            ExitCode::FAILURE
        }
    }
}
