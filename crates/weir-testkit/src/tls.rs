//! A test PKI made with `openssl` (and `keytool` for Java's truststore): a CA, a server
//! certificate for `127.0.0.1` and `localhost` signed by it, a client certificate signed by it,
//! and a second, unrelated CA with a client certificate of its own (which a server trusting the
//! first CA must refuse). Keys are unencrypted PEM, readable by their owner only.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The files of a [`TestPki`], all PEM unless said otherwise.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The directory holding everything.
    pub dir: PathBuf,
    /// The CA's certificate.
    pub ca: PathBuf,
    /// The CA's key.
    pub ca_key: PathBuf,
    /// The server's certificate (`127.0.0.1`, `localhost`), signed by the CA.
    pub server_cert: PathBuf,
    /// The server's key.
    pub server_key: PathBuf,
    /// A client certificate signed by the CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// An unrelated CA's certificate.
    pub other_ca: PathBuf,
    /// A client certificate signed by the unrelated CA.
    pub other_client_cert: PathBuf,
    /// Its key.
    pub other_client_key: PathBuf,
}

/// The password of [`TestPki::java_truststore`]'s stores.
pub const TRUSTSTORE_PASSWORD: &str = "weir-test";

fn run(what: &str, program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {what}: cannot run it ({e}); the TLS tests need it"));
    assert!(
        out.status.success(),
        "{program} {what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn openssl(what: &str, args: &[&str]) {
    run(
        &format!("{what} (the TLS tests need openssl: apt-get install openssl)"),
        "openssl",
        args,
    );
}

/// Makes a self-signed CA `name` in `dir` (`<name>.crt`, `<name>.key`).
fn make_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    openssl(
        "req (a CA)",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &key.display().to_string(),
            "-out",
            &crt.display().to_string(),
        ],
    );
    (crt, key)
}

/// Makes a key and certificate `name` in `dir` signed by `ca`, with the extensions `ext`.
fn make_leaf(
    dir: &Path,
    name: &str,
    cn: &str,
    ext: &str,
    ca: &(PathBuf, PathBuf),
) -> (PathBuf, PathBuf) {
    let d = |f: &str| dir.join(f).display().to_string();
    let (crt, key, csr, extfile) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
        d(&format!("{name}.csr")),
        d(&format!("{name}.ext")),
    );
    std::fs::write(&extfile, ext).expect("writing the certificate extensions");
    openssl(
        "req (a certificate request)",
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &key.display().to_string(),
            "-out",
            &csr,
        ],
    );
    openssl(
        "x509 (signing a certificate)",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca.0.display().to_string(),
            "-CAkey",
            &ca.1.display().to_string(),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &extfile,
            "-out",
            &crt.display().to_string(),
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod of a key");
    (crt, key)
}

impl TestPki {
    /// Makes the whole PKI in `dir` (created if missing).
    pub fn create(dir: &Path) -> TestPki {
        std::fs::create_dir_all(dir).expect("creating the PKI directory");
        let ca = make_ca(dir, "weir-test-ca");
        let server = make_leaf(
            dir,
            "server",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
            &ca,
        );
        let client_ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
                          extendedKeyUsage=clientAuth\n";
        let client = make_leaf(dir, "client", "weir-test-client", client_ext, &ca);
        let other = make_ca(dir, "weir-other-ca");
        let other_client = make_leaf(dir, "other-client", "weir-other-client", client_ext, &other);
        TestPki {
            dir: dir.to_path_buf(),
            ca: ca.0,
            ca_key: ca.1,
            server_cert: server.0,
            server_key: server.1,
            client_cert: client.0,
            client_key: client.1,
            other_ca: other.0,
            other_client_cert: other_client.0,
            other_client_key: other_client.1,
        }
    }

    /// A Java truststore holding the CA, of `store_type` (`JKS` or `PKCS12`), with the password
    /// [`TRUSTSTORE_PASSWORD`]; made with `keytool` (Java 17) on first call.
    pub fn java_truststore(&self, store_type: &str) -> PathBuf {
        let path = self
            .dir
            .join(format!("truststore.{}", store_type.to_ascii_lowercase()));
        if !path.exists() {
            let keytool = crate::peers::java()
                .parent()
                .map(|bin| bin.join("keytool"))
                .filter(|k| k.exists())
                .unwrap_or_else(|| PathBuf::from("keytool"));
            run(
                "-importcert (the Java truststore)",
                &keytool.display().to_string(),
                &[
                    "-importcert",
                    "-noprompt",
                    "-alias",
                    "weir-test-ca",
                    "-file",
                    &self.ca.display().to_string(),
                    "-keystore",
                    &path.display().to_string(),
                    "-storetype",
                    store_type,
                    "-storepass",
                    TRUSTSTORE_PASSWORD,
                ],
            );
        }
        path
    }
}

/// A TLS client connection to `addr` trusting the CA certificates in `ca`, presenting `client`
/// (certificate, key) when given; the server name checked is `127.0.0.1`.
///
/// # Errors
/// Connecting or the handshake failed (a refused client certificate shows here or at the
/// first read, as TLS 1.3 allows).
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("the CA file") {
        roots
            .add(c.expect("a CA certificate"))
            .expect("a usable CA");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .expect("the client certificate file")
                    .map(|c| c.expect("a client certificate"))
                    .collect(),
                PrivateKeyDer::from_pem_file(key).expect("the client key"),
            )
            .expect("a client certificate and its key"),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            ServerName::try_from("127.0.0.1").expect("a server name"),
            tcp,
        )
        .await
}
