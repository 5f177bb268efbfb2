//! Throwaway certificate authorities for the TLS tests, made with the `openssl` command at test
//! time: a CA, a server certificate for the names asked, and a client certificate.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::servers::run_dir;

/// A CA with one server and one client certificate (PEM files, EC P-256).
pub struct Pki {
    /// The CA's certificate.
    pub ca: PathBuf,
    /// The server's certificate and key.
    pub server_cert: PathBuf,
    /// The server's key.
    pub server_key: PathBuf,
    /// A client certificate (extended key usage clientAuth) and its key.
    pub client_cert: PathBuf,
    /// The client key.
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out =
        Command::new("openssl").current_dir(dir).args(args).output().unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}): the TLS tests make their certificates with it; apt-get install -y openssl")
        });
    assert!(out.status.success(), "openssl {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

impl Pki {
    /// A new CA named `name`, with a server certificate for `server_names` (`DNS:localhost`,
    /// `IP:127.0.0.1`, …), in a directory of its own under the run dir.
    pub fn new(name: &str, server_names: &[&str]) -> Pki {
        let dir = run_dir().join(format!("pki-{name}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("the pki dir");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let subject = format!("/CN=sidebus test CA {name}");
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", &subject]);
        ca.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        openssl(&dir, &ca);
        let sign = |who: &str, cn: &str, ext: String| {
            std::fs::write(dir.join(format!("{who}.ext")), ext).expect("write an extensions file");
            let subj = format!("/CN={cn}");
            let mut req = vec!["req"];
            req.extend(ec);
            let (key, csr, pem, extfile) = (format!("{who}.key"), format!("{who}.csr"), format!("{who}.pem"), format!("{who}.ext"));
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(&dir, &req);
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    "2",
                    "-extfile",
                    &extfile,
                ],
            );
        };
        let base = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n";
        sign(
            "server",
            server_names.first().map_or("localhost", |n| n.split(':').nth(1).unwrap_or(n)),
            format!("{base}extendedKeyUsage=serverAuth\nsubjectAltName={}\n", server_names.join(",")),
        );
        sign("client", "sidebus", format!("{base}extendedKeyUsage=clientAuth\n"));
        Pki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}
