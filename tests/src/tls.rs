//! Throw-away PKI for mTLS tests: a CA, a server certificate for 127.0.0.1/localhost, client
//! certificates, and a second, unrelated CA.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

pub struct Pem {
    pub cert: String,
    pub key: String,
}

pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub server: Pem,
    pub client: Pem,
    /// Signed by a CA the agent does not trust.
    pub rogue_client: Pem,
    /// Signed by the trusted CA, but with an identity that is not the coordinator's.
    pub other_client: Pem,
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca")
}

fn leaf(issuer: &CertifiedIssuer<'static, KeyPair>, cn: &str, sans: &[&str]) -> Pem {
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("params");
    p.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().expect("key");
    let cert = p.signed_by(&key, issuer).expect("sign");
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

impl Pki {
    /// Creates the PKI and writes ca.pem, server.pem, server-key.pem, client.pem and client-key.pem
    /// into `dir`.
    /// A whole new PKI (CA and certificates) in place of this one, as a renewal under running
    /// processes sees it: each file is replaced by a rename, one after another. Returns the old one.
    pub fn rotate(&mut self) -> Pki {
        let next = self.dir.join(".next");
        let mut new = Pki::create(&next);
        for f in [
            "ca.pem",
            "server.pem",
            "server-key.pem",
            "client.pem",
            "client-key.pem",
        ] {
            std::fs::rename(next.join(f), self.dir.join(f)).expect("replace a PKI file");
        }
        new.dir = self.dir.clone();
        std::mem::replace(self, new)
    }

    pub fn create(dir: &Path) -> Pki {
        let ca = new_ca("stowage test CA");
        let rogue = new_ca("some other CA");
        let server = leaf(
            &ca,
            "stowage-agent",
            &[
                "localhost",
                "127.0.0.1",
                "127.0.0.11",
                "127.0.0.12",
                "127.0.0.13",
            ],
        );
        let client = leaf(&ca, "stowage-coordinator", &["stowage-coordinator"]);
        let rogue_client = leaf(&rogue, "stowage-coordinator", &["stowage-coordinator"]);
        let other_client = leaf(&ca, "some-other-component", &["other.example"]);
        std::fs::create_dir_all(dir).expect("pki dir");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
        std::fs::write(dir.join("server.pem"), &server.cert).expect("write");
        std::fs::write(dir.join("server-key.pem"), &server.key).expect("write");
        std::fs::write(dir.join("client.pem"), &client.cert).expect("write");
        std::fs::write(dir.join("client-key.pem"), &client.key).expect("write");
        Pki {
            dir: dir.to_path_buf(),
            ca_pem: ca.pem(),
            server,
            client,
            rogue_client,
            other_client,
        }
    }
}
