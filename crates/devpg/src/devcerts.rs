//! Throw-away TLS certificates for tests and local stacks: a private CA that issues
//! server certificates (for `localhost`/`127.0.0.1`) and client certificates (naming an
//! agent id, as mutual TLS on the agent link expects). Never for production: keys are
//! generated in memory and written unencrypted.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Paths of a certificate and key written to disk.
#[derive(Clone, Debug)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A private certificate authority.
#[derive(Debug)]
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl DevCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let issuer = CertifiedIssuer::self_signed(params, key)?;
        Ok(Self { issuer })
    }

    /// The CA certificate, for clients' and servers' trust stores.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str]) -> Result<Issued, rcgen::Error> {
        self.issue(names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate whose DNS names are `names` (an agent's id, for mutual TLS).
    pub fn client(&self, names: &[&str]) -> Result<Issued, rcgen::Error> {
        self.issue(names, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Issued, rcgen::Error> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, first);
        }
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes the CA certificate to `dir/ca.pem` and returns its path.
    pub fn write_ca(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.cert_pem())?;
        Ok(path)
    }
}

impl Issued {
    /// Writes `dir/<stem>.pem` and `dir/<stem>.key` (the key 0600).
    pub fn write(&self, dir: &Path, stem: &str) -> std::io::Result<IssuedFiles> {
        use std::os::unix::fs::PermissionsExt;
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem)?;
        std::fs::write(&key, &self.key_pem)?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        Ok(IssuedFiles { cert, key })
    }
}
