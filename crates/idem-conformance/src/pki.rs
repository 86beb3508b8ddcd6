//! Certificates made by the test (rcgen), written as PEM files in a temporary folder:
//! a CA, and server or client certificates it signs, valid or expired, for the TLS
//! tests that talk to real servers on loopback.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// The certificate (leaf first, then the CA that signed it).
    pub cert: PathBuf,
    /// The private key (PKCS#8).
    pub key: PathBuf,
}

/// How long a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From yesterday to a year from now.
    Current,
    /// From 2020 to yesterday.
    Expired,
}

/// A test CA with its own folder. Dropping it removes the files.
pub struct TestCa {
    name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
    serial: std::sync::atomic::AtomicU64,
}

impl TestCa {
    /// A new CA; `name` names its files and its subject.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("idem test CA {name}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        let dir = tempfile::tempdir().expect("a temporary folder");
        std::fs::write(dir.path().join(format!("{name}-ca.crt")), issuer.pem()).expect("write CA");
        TestCa {
            name: name.to_owned(),
            issuer,
            dir,
            serial: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// The CA certificate's PEM file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join(format!("{}-ca.crt", self.name))
    }

    /// The folder the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for these names (DNS names or IP addresses), written as
    /// `<file>.crt` and `<file>.key`.
    pub fn server(&self, file: &str, names: &[&str], validity: Validity) -> PemPair {
        // Client use too: Redis Cluster nodes show their server certificate to each other.
        self.issue(
            file,
            names,
            validity,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// A client certificate with this common name.
    pub fn client(&self, file: &str, common_name: &str) -> PemPair {
        self.issue(
            file,
            &[common_name],
            Validity::Current,
            &[ExtendedKeyUsagePurpose::ClientAuth],
        )
    }

    fn issue(
        &self,
        file: &str,
        names: &[&str],
        validity: Validity,
        usage: &[ExtendedKeyUsagePurpose],
    ) -> PemPair {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = usage.to_vec();
        let serial = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        params.serial_number = Some(serial.into());
        let day = time::Duration::days(1);
        let now = time::OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = match validity {
            Validity::Current => (now - day, now + 365 * day),
            Validity::Expired => (rcgen::date_time_ymd(2020, 1, 1), now - day),
        };
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        let pair = PemPair {
            cert: self.dir.path().join(format!("{file}.crt")),
            key: self.dir.path().join(format!("{file}.key")),
        };
        std::fs::write(&pair.cert, cert.pem() + &self.issuer.pem()).expect("write cert");
        std::fs::write(&pair.key, key.serialize_pem()).expect("write key");
        pair
    }
}
