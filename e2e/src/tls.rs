//! Test PKI: CAs and serving certificates made on the spot with rcgen, and a directory laid
//! out like a Kubernetes Secret volume whose contents change by one atomic `..data`
//! symlink swap, as the kubelet does it.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA that issues serving certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// A serving certificate for `names` (DNS names or IP addresses): (cert PEM, key PEM).
    pub fn issue(&self, names: &[String]) -> Result<(String, String)> {
        let params = CertificateParams::new(names.to_vec())?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes the CA certificate to `path` and returns it.
    pub fn write_pem(&self, path: &Path) -> Result<PathBuf> {
        std::fs::write(path, &self.pem)?;
        Ok(path.to_owned())
    }
}

/// Files behind a `..data` symlink, like a mounted Secret: versioned directories, a
/// `..data` symlink to the current one, and one symlink per file through `..data`.
pub struct SecretDir {
    pub root: tempfile::TempDir,
    version: u32,
}

impl SecretDir {
    /// `tls.crt` and `tls.key`.
    pub fn new(cert: &str, key: &str) -> Result<Self> {
        Self::with_files(&[("tls.crt", cert), ("tls.key", key)])
    }

    /// The files given as `(name, content)`.
    pub fn with_files(files: &[(&str, &str)]) -> Result<Self> {
        let mut dir = Self {
            root: tempfile::tempdir()?,
            version: 0,
        };
        dir.publish_files(files)?;
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.path(name))?;
        }
        Ok(dir)
    }

    /// Writes a new `tls.crt` and `tls.key`, see [`SecretDir::publish_files`].
    pub fn publish(&mut self, cert: &str, key: &str) -> Result<()> {
        self.publish_files(&[("tls.crt", cert), ("tls.key", key)])
    }

    /// Writes a new version and swaps `..data` to it with one rename, as the kubelet does.
    pub fn publish_files(&mut self, files: &[(&str, &str)]) -> Result<()> {
        self.version += 1;
        let name = format!("..v{}", self.version);
        let dir = self.root.path().join(&name);
        std::fs::create_dir(&dir)?;
        for (file, content) in files {
            std::fs::write(dir.join(file), content)?;
        }
        let tmp = self.root.path().join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp)?;
        std::fs::rename(&tmp, self.root.path().join("..data"))?;
        Ok(())
    }

    /// Where file `name` is read, through `..data`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    pub fn cert(&self) -> PathBuf {
        self.path("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.path("tls.key")
    }

    /// Broker flags that serve this directory's certificate.
    pub fn broker_args(&self) -> Vec<String> {
        vec![
            "--tls-cert-file".into(),
            self.cert().display().to_string(),
            "--tls-key-file".into(),
            self.key().display().to_string(),
        ]
    }
}
