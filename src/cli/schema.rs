//! `sidebus schema register|get|list|check`: the schema registry from the command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use sidebus_client::{Compatibility, Error, RegisterSchema};

use super::{ConnArgs, EXIT_DATAERR, Output, exit_for, msgpack_json, report};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: SchemaCommand,
}

/// A schema file to register or check.
#[derive(clap::Args, Debug)]
pub struct FileArgs {
    /// The event type.
    event_type: String,
    /// The JSON Schema file.
    file: PathBuf,
    #[command(flatten)]
    mode: Mode,
    #[command(flatten)]
    out: Output,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Subcommand, Debug)]
pub enum SchemaCommand {
    /// Register a JSON Schema file as the next version of a type's schema.
    #[command(
        after_help = "Prints the version. Registering the latest schema again returns its version.\nExit codes: 0 registered, 1 refused (incompatible or invalid; the reasons are printed), 65 unreadable file, 69 daemon unreachable.\n\nExamples:\n  sidebus schema register order.created schemas/order.created.json\n  sidebus schema register order.created v2.json --compatibility full_transitive"
    )]
    Register(FileArgs),
    /// Check whether a JSON Schema file could be registered: valid, and compatible.
    #[command(
        after_help = "Nothing is stored. Exit codes: 0 compatible, 1 not (the breaking changes are printed).\n\nExample:\n  sidebus schema check order.created schemas/order.created.json"
    )]
    Check(FileArgs),
    /// Print a type's schema (the latest version, or --version).
    #[command(after_help = "Examples:\n  sidebus schema get order.created\n  sidebus schema get order.created --version 2 > v2.json")]
    Get {
        /// The event type.
        event_type: String,
        /// The version.
        #[arg(long)]
        version: Option<u64>,
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List the types with a schema: latest version and compatibility mode.
    #[command(after_help = "Examples:\n  sidebus schema list\n  sidebus schema list --json | jq '.types[].type'")]
    List {
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// The type's settings a registration may change.
#[derive(clap::Args, Debug, Clone)]
pub struct Mode {
    /// Set the type's compatibility mode: backward, backward_transitive, forward,
    /// forward_transitive, full, full_transitive or none.
    #[arg(long, value_parser = parse_mode)]
    pub compatibility: Option<Compatibility>,
    /// Read open content models strictly: a property added while earlier versions allowed
    /// unlisted properties counts as breaking.
    #[arg(long)]
    pub strict: bool,
}

fn parse_mode(s: &str) -> Result<Compatibility, String> {
    Compatibility::parse(s).ok_or_else(|| {
        let all: Vec<&str> = Compatibility::ALL.iter().map(|c| c.as_str()).collect();
        format!("must be one of {}", all.join(", "))
    })
}

fn read_schema(file: &Path) -> Result<serde_json::Value, ExitCode> {
    let text = std::fs::read(file).map_err(|e| {
        eprintln!("sidebus: cannot read {}: {e}", file.display());
        ExitCode::from(EXIT_DATAERR)
    })?;
    serde_json::from_slice(&text).map_err(|e| {
        eprintln!("sidebus: {} is not JSON: {e}", file.display());
        ExitCode::from(EXIT_DATAERR)
    })
}

fn fail(e: &Error) -> ExitCode {
    report(e);
    exit_for(e)
}

pub async fn run(args: Args) -> ExitCode {
    match args.command {
        SchemaCommand::Register(a) => register(a.event_type, &a.file, a.mode, a.out, a.conn, false).await,
        SchemaCommand::Check(a) => register(a.event_type, &a.file, a.mode, a.out, a.conn, true).await,
        SchemaCommand::Get { event_type, version, out, conn } => {
            let c = match conn.connect().await {
                Ok(c) => c,
                Err(code) => return code,
            };
            match c.get_schema(&event_type, version).await {
                Ok(info) => {
                    let schema = msgpack_json(&info.schema);
                    if out.json {
                        let v = serde_json::json!({"type": info.event_type, "version": info.version, "compatibility": info.compatibility.as_str(), "strict": info.strict, "schema": schema});
                        println!("{v}");
                    } else {
                        if std::io::stdout().is_terminal() {
                            eprintln!(
                                "# {} version {} ({}{})",
                                info.event_type,
                                info.version,
                                info.compatibility,
                                if info.strict { ", strict" } else { "" }
                            );
                        }
                        println!("{}", serde_json::to_string_pretty(&schema).unwrap_or_default());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        SchemaCommand::List { out, conn } => {
            let c = match conn.connect().await {
                Ok(c) => c,
                Err(code) => return code,
            };
            match c.list_schemas().await {
                Ok(list) => {
                    if out.json {
                        let types: Vec<serde_json::Value> = list
                            .types
                            .iter()
                            .map(|t| serde_json::json!({"type": t.event_type, "latest": t.latest, "compatibility": t.compatibility.as_str()}))
                            .collect();
                        println!("{}", serde_json::json!({ "types": types }));
                    } else {
                        let width = list.types.iter().map(|t| t.event_type.len()).max().unwrap_or(0).max(4);
                        println!("{:<width$}  {:>6}  COMPATIBILITY", "TYPE", "LATEST");
                        for t in &list.types {
                            println!("{:<width$}  {:>6}  {}", t.event_type, t.latest, t.compatibility);
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
    }
}

async fn register(event_type: String, file: &Path, mode: Mode, out: Output, conn: ConnArgs, dry_run: bool) -> ExitCode {
    let schema = match read_schema(file) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let encoded = match sidebus_client::encode(&schema) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("sidebus: {e}");
            return ExitCode::from(EXIT_DATAERR);
        }
    };
    let c = match conn.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let r = RegisterSchema { event_type, schema: encoded, compatibility: mode.compatibility, strict: mode.strict.then_some(true), dry_run };
    match c.register_schema_with(r).await {
        Ok(done) => {
            if out.json {
                println!(
                    "{}",
                    serde_json::json!({"type": done.event_type, "version": done.version, "created": done.created, "dry_run": dry_run})
                );
            } else if dry_run {
                if done.created {
                    println!("compatible: it would be version {} of {}", done.version, done.event_type);
                } else {
                    println!("identical to version {} of {}", done.version, done.event_type);
                }
            } else if done.created {
                println!("registered {} version {}", done.event_type, done.version);
            } else {
                println!("unchanged: {} version {} is already this schema", done.event_type, done.version);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if out.json
                && let Error::Server { code, message, details } = &e
            {
                let reasons: Vec<String> = details
                    .iter()
                    .map(|d| match d {
                        sidebus_protocol::Detail::Field { field, message } => format!("{field}: {message}"),
                        sidebus_protocol::Detail::Path { path, message } => format!("{path}: {message}"),
                        sidebus_protocol::Detail::Reason { message } => message.clone(),
                    })
                    .collect();
                println!("{}", serde_json::json!({"error": code.as_str(), "message": message, "reasons": reasons}));
                return exit_for(&e);
            }
            fail(&e)
        }
    }
}
