//! Certificate generation and inspection, with no I/O: [`plan`] looks at what the Secret
//! holds and the time, and returns what it should hold and why. Keeping the decision pure
//! lets every renewal rule be tested by moving `now` instead of waiting for a clock.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Secret key of the serving certificate (the `kubernetes.io/tls` convention).
pub const TLS_CRT: &str = "tls.crt";
/// Secret key of the serving certificate's private key.
pub const TLS_KEY: &str = "tls.key";
/// Secret key of the CA bundle: the current CA, then any previous CA still trusted.
pub const CA_CRT: &str = "ca.crt";
/// Secret key of the current CA's private key, kept so later runs can sign renewals.
pub const CA_KEY: &str = "ca.key";

/// Certificates are dated this far back so that an API server whose clock runs slightly
/// behind ours does not see them as not yet valid.
const CLOCK_SKEW: Duration = Duration::minutes(5);

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors while issuing certificates. Reading stored material never fails: whatever cannot
/// be read is replaced, and the reason is reported as a [`Reason`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rcgen rejected the parameters or could not sign (for example an invalid DNS name).
    #[error("issuing the {what}")]
    Issue {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    /// The validity settings cannot produce a usable certificate.
    #[error("invalid certificate settings: {0}")]
    Settings(String),
}

/// What the certificates must look like and when they are renewed.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// DNS names the serving certificate must carry, in order; the API server connects to
    /// `<service>.<namespace>.svc`, the others cover in-cluster tools and tests.
    pub dns_names: Vec<String>,
    /// Common name of the serving certificate (informational; clients check the SANs).
    pub common_name: String,
    /// Common name prefix of generated CAs; a timestamp is appended so that the current
    /// and the previous CA in a bundle have different subjects.
    pub ca_name: String,
    /// Lifetime of a newly issued CA.
    pub ca_validity: Duration,
    /// Lifetime of a newly issued serving certificate (cut to the CA's own end).
    pub serving_validity: Duration,
    /// A certificate is renewed once less than this fraction of its lifetime remains.
    pub renew_fraction: f64,
    /// How long a replaced CA stays in the bundle after a rotation, so that injector pods
    /// still serving the old certificate (the kubelet refreshes mounted Secrets with a
    /// delay) keep being trusted.
    pub ca_overlap: Duration,
}

impl Policy {
    /// The names a Service is reached by inside the cluster: `<svc>`, `<svc>.<ns>`,
    /// `<svc>.<ns>.svc` and `<svc>.<ns>.svc.<cluster domain>`.
    pub fn service_dns_names(service: &str, namespace: &str, cluster_domain: &str) -> Vec<String> {
        let domain = cluster_domain.trim_matches('.');
        let mut names = vec![
            service.to_string(),
            format!("{service}.{namespace}"),
            format!("{service}.{namespace}.svc"),
        ];
        if !domain.is_empty() {
            names.push(format!("{service}.{namespace}.svc.{domain}"));
        }
        names
    }

    fn check(&self) -> Result<()> {
        if self.dns_names.is_empty() {
            return Err(Error::Settings(
                "no DNS names for the serving certificate".into(),
            ));
        }
        if self.ca_validity <= CLOCK_SKEW || self.serving_validity <= CLOCK_SKEW {
            return Err(Error::Settings(format!(
                "validities must be longer than {CLOCK_SKEW}"
            )));
        }
        if !(self.renew_fraction > 0.0 && self.renew_fraction < 1.0) {
            return Err(Error::Settings(format!(
                "renew fraction {} is not between 0 and 1",
                self.renew_fraction
            )));
        }
        Ok(())
    }
}

/// The four PEM texts stored in the Secret. An absent or non-UTF-8 entry reads as empty.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Material {
    /// Serving certificate (`tls.crt`).
    pub tls_crt: String,
    /// Serving private key, PKCS#8 (`tls.key`).
    pub tls_key: String,
    /// CA bundle (`ca.crt`): current CA first, then previous CAs inside their overlap.
    pub ca_crt: String,
    /// Current CA private key, PKCS#8 (`ca.key`).
    pub ca_key: String,
}

// Private keys must never reach a log line, even through `{:?}`.
impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("tls_crt_len", &self.tls_crt.len())
            .field("tls_key", &"<redacted>")
            .field("ca_crt_len", &self.ca_crt.len())
            .field("ca_key", &"<redacted>")
            .finish()
    }
}

impl Material {
    /// Reads the entries of a Secret's `data`.
    pub fn from_data(data: &BTreeMap<String, Vec<u8>>) -> Self {
        let text = |key: &str| {
            data.get(key)
                .and_then(|v| String::from_utf8(v.clone()).ok())
                .unwrap_or_default()
        };
        Self {
            tls_crt: text(TLS_CRT),
            tls_key: text(TLS_KEY),
            ca_crt: text(CA_CRT),
            ca_key: text(CA_KEY),
        }
    }

    /// The entries to store in a Secret's `data`.
    pub fn to_data(&self) -> BTreeMap<String, Vec<u8>> {
        [
            (TLS_CRT, &self.tls_crt),
            (TLS_KEY, &self.tls_key),
            (CA_CRT, &self.ca_crt),
            (CA_KEY, &self.ca_key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone().into_bytes()))
        .collect()
    }
}

/// Why a certificate is (re)issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Nothing was stored yet.
    Missing,
    /// Stored data could not be used; the text says what was wrong.
    Unusable(String),
    /// `now` is before the certificate's notBefore (a clock moved backwards).
    NotYetValid,
    /// The certificate has expired.
    Expired,
    /// Less than the renew fraction of its lifetime remains.
    RenewalDue { not_after: OffsetDateTime },
    /// The serving certificate is not signed by the current CA (for example after a CA
    /// rotation).
    NewCa,
    /// The serving certificate's DNS names differ from the wanted ones.
    NamesChanged,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("none stored yet"),
            Self::Unusable(why) => write!(f, "stored one is unusable: {why}"),
            Self::NotYetValid => f.write_str("stored one is not valid yet"),
            Self::Expired => f.write_str("stored one has expired"),
            Self::RenewalDue { not_after } => {
                write!(f, "renewal due, stored one expires at {not_after}")
            }
            Self::NewCa => f.write_str("stored one is not signed by the current CA"),
            Self::NamesChanged => f.write_str("stored one has other DNS names"),
        }
    }
}

/// One change [`plan`] makes to the stored material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new CA was generated; the previous one, if still valid, stays in the bundle.
    CaIssued(Reason),
    /// A new serving certificate and key were issued by the current CA.
    ServingIssued(Reason),
    /// Previous CAs left the bundle (expired, or their overlap after a rotation is over).
    PreviousCaDropped { count: usize },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CaIssued(r) => write!(f, "new CA ({r})"),
            Self::ServingIssued(r) => write!(f, "new serving certificate ({r})"),
            Self::PreviousCaDropped { count } => {
                write!(f, "dropped {count} previous CA(s) from the bundle")
            }
        }
    }
}

/// What the Secret should hold, and the changes from what it holds. No changes means the
/// stored material is returned byte for byte, so callers can skip every write.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub material: Material,
    pub changes: Vec<Change>,
}

impl Plan {
    pub fn is_unchanged(&self) -> bool {
        self.changes.is_empty()
    }
}

/// The fields of a parsed certificate that the renewal rules look at.
#[derive(Clone, Debug)]
pub struct CertInfo {
    pub der: Vec<u8>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub is_ca: bool,
    pub dns_names: Vec<String>,
    /// The subject public key bits, compared against a private key's public half.
    pub public_key: Vec<u8>,
}

impl CertInfo {
    /// Parses one DER certificate.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (rest, cert) = X509Certificate::from_der(der).ok()?;
        if !rest.is_empty() {
            return None;
        }
        let dns_names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(name) => Some(name.to_string()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(_) => return None,
        };
        Some(Self {
            der: der.to_vec(),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            is_ca: cert.is_ca(),
            dns_names,
            public_key: cert.public_key().subject_public_key.data.to_vec(),
        })
    }

    /// Why this certificate must be replaced at `now`, if it must.
    fn lifetime_reason(&self, now: OffsetDateTime, renew_fraction: f64) -> Option<Reason> {
        if now < self.not_before {
            return Some(Reason::NotYetValid);
        }
        if now >= self.not_after {
            return Some(Reason::Expired);
        }
        if renewal_due(self.not_before, self.not_after, now, renew_fraction) {
            return Some(Reason::RenewalDue {
                not_after: self.not_after,
            });
        }
        None
    }
}

/// True once less than `fraction` of the lifetime between `not_before` and `not_after`
/// remains at `now`.
pub fn renewal_due(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
    fraction: f64,
) -> bool {
    let lifetime = not_after - not_before;
    not_after - now < lifetime * fraction
}

/// Every certificate of a PEM bundle, in order. `None` if the text is not PEM or holds a
/// block that is not a parseable certificate.
pub fn parse_bundle(pem_text: &[u8]) -> Option<Vec<CertInfo>> {
    let blocks = pem::parse_many(pem_text).ok()?;
    if blocks.is_empty() {
        return None;
    }
    blocks
        .iter()
        .map(|b| (b.tag() == "CERTIFICATE").then(|| CertInfo::from_der(b.contents()))?)
        .collect()
}

/// The set of certificates in a PEM bundle, for comparing two bundles regardless of order
/// and formatting. `None` if the text is not a bundle of certificates.
pub fn bundle_set(pem_text: &[u8]) -> Option<BTreeSet<Vec<u8>>> {
    parse_bundle(pem_text).map(|certs| certs.into_iter().map(|c| c.der).collect())
}

/// True if `leaf_der` carries a valid signature by the CA certificate `ca_der`.
pub fn signed_by(leaf_der: &[u8], ca_der: &[u8]) -> bool {
    let (Ok((_, leaf)), Ok((_, ca))) = (
        X509Certificate::from_der(leaf_der),
        X509Certificate::from_der(ca_der),
    ) else {
        return false;
    };
    leaf.issuer().as_raw() == ca.subject().as_raw()
        && leaf.verify_signature(Some(ca.public_key())).is_ok()
}

fn encode_cert(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), config)
}

/// The CA that signs serving certificates in this run.
struct Ca {
    info: CertInfo,
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// Finds the current CA: the certificate in the bundle whose public key belongs to the
/// stored CA key.
fn read_ca(stored: &Material, bundle: &[CertInfo]) -> Result<Ca, Reason> {
    if stored.ca_key.trim().is_empty() && stored.ca_crt.trim().is_empty() {
        return Err(Reason::Missing);
    }
    let key = KeyPair::from_pem(&stored.ca_key)
        .map_err(|e| Reason::Unusable(format!("{CA_KEY} is not a private key: {e}")))?;
    if bundle.is_empty() {
        return Err(Reason::Unusable(format!(
            "{CA_CRT} holds no readable certificate"
        )));
    }
    let info = bundle
        .iter()
        .find(|c| c.public_key == key.public_key_raw())
        .ok_or_else(|| Reason::Unusable(format!("no certificate in {CA_CRT} matches {CA_KEY}")))?
        .clone();
    if !info.is_ca {
        return Err(Reason::Unusable(format!(
            "the certificate for {CA_KEY} is not a CA"
        )));
    }
    let cert_pem = encode_cert(&info.der);
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
        .map_err(|e| Reason::Unusable(format!("CA certificate: {e}")))?;
    Ok(Ca {
        info,
        cert_pem,
        key_pem: stored.ca_key.clone(),
        issuer,
    })
}

fn issue_ca(policy: &Policy, now: OffsetDateTime) -> Result<Ca> {
    let issue = |source| Error::Issue { what: "CA", source };
    let key = KeyPair::generate().map_err(issue)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("{}@{}", policy.ca_name, now.unix_timestamp()),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + policy.ca_validity;
    let cert = params.self_signed(&key).map_err(issue)?;
    let info = CertInfo::from_der(cert.der()).ok_or_else(|| {
        Error::Settings("the generated CA certificate cannot be read back".into())
    })?;
    Ok(Ca {
        info,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        issuer: Issuer::new(params, key),
    })
}

/// Issues a serving certificate for `policy.dns_names`; returns (certificate, key) PEM.
fn issue_serving(policy: &Policy, ca: &Ca, now: OffsetDateTime) -> Result<(String, String)> {
    let issue = |source| Error::Issue {
        what: "serving certificate",
        source,
    };
    let key = KeyPair::generate().map_err(issue)?;
    let mut params = CertificateParams::new(policy.dns_names.clone()).map_err(issue)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, policy.common_name.clone());
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - CLOCK_SKEW;
    // A certificate outliving its CA would only look valid: cut it to the CA's end.
    params.not_after = (now + policy.serving_validity).min(ca.info.not_after);
    let cert = params.signed_by(&key, &ca.issuer).map_err(issue)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Checks the stored serving certificate against the current CA and the policy.
/// Why the stored serving certificate must be replaced, if it must.
///
/// After a CA rotation the certificate of a previous CA that is still in the bundle is
/// kept until `switch_at`, half-way through the overlap. So every client first gets a
/// bundle trusting both CAs, then the server a certificate of the new one, then the
/// bundle loses the old CA: each step waits hours for the previous one to reach every
/// mounted copy (the kubelet takes a minute or two), so no client sees a certificate from
/// a CA its copy does not trust yet, and no server keeps one its clients no longer trust.
fn serving_reason(
    stored: &Material,
    ca: &Ca,
    previous: &[&CertInfo],
    switch_at: OffsetDateTime,
    policy: &Policy,
    now: OffsetDateTime,
) -> Option<Reason> {
    if stored.tls_crt.trim().is_empty() && stored.tls_key.trim().is_empty() {
        return Some(Reason::Missing);
    }
    let cert = match parse_bundle(stored.tls_crt.as_bytes()).as_deref() {
        Some([cert]) => cert.clone(),
        _ => {
            return Some(Reason::Unusable(format!(
                "{TLS_CRT} is not one certificate"
            )));
        }
    };
    match KeyPair::from_pem(&stored.tls_key) {
        Ok(key) if key.public_key_raw() == cert.public_key.as_slice() => {}
        Ok(_) => {
            return Some(Reason::Unusable(format!(
                "{TLS_KEY} does not match {TLS_CRT}"
            )));
        }
        Err(e) => {
            return Some(Reason::Unusable(format!(
                "{TLS_KEY} is not a private key: {e}"
            )));
        }
    }
    if !signed_by(&cert.der, &ca.info.der) {
        let by_previous = previous.iter().any(|p| signed_by(&cert.der, &p.der));
        if !by_previous || now >= switch_at {
            return Some(Reason::NewCa);
        }
    }
    if cert.dns_names != policy.dns_names {
        return Some(Reason::NamesChanged);
    }
    cert.lifetime_reason(now, policy.renew_fraction)
}

/// Decides what the Secret should hold at `now`, given what it holds (`None` when there is
/// no Secret yet).
///
/// - CA missing, unreadable, or with less than the renew fraction of its lifetime left:
///   a new CA; the old one stays in the bundle for `ca_overlap` (if not expired).
/// - Serving certificate missing, unreadable, not from the current CA, with other DNS
///   names, or due for renewal: a new one signed by the current CA.
/// - Otherwise the stored texts are kept byte for byte.
pub fn plan(stored: Option<&Material>, policy: &Policy, now: OffsetDateTime) -> Result<Plan> {
    policy.check()?;
    let empty = Material::default();
    let stored = stored.unwrap_or(&empty);
    let mut changes = Vec::new();

    // An unreadable bundle contributes nothing; its CAs cannot be carried over anyway.
    let stored_bundle = parse_bundle(stored.ca_crt.as_bytes()).unwrap_or_default();
    let ca = match read_ca(stored, &stored_bundle) {
        Ok(ca) => match ca.info.lifetime_reason(now, policy.renew_fraction) {
            None => ca,
            Some(reason) => {
                changes.push(Change::CaIssued(reason));
                issue_ca(policy, now)?
            }
        },
        Err(reason) => {
            changes.push(Change::CaIssued(reason));
            issue_ca(policy, now)?
        }
    };

    // Previous CAs stay trusted while pods may still serve certificates they signed: until
    // the overlap after the current CA was issued is over, and never past their expiry.
    let overlap_ends = ca.info.not_before + CLOCK_SKEW + policy.ca_overlap;
    let mut previous: Vec<&CertInfo> = Vec::new();
    for cert in &stored_bundle {
        let keep = cert.der != ca.info.der
            && cert.is_ca
            && now < cert.not_after
            && now < overlap_ends
            && !previous.iter().any(|p| p.der == cert.der);
        if keep {
            previous.push(cert);
        }
    }
    let stored_ders: Vec<&[u8]> = stored_bundle.iter().map(|c| c.der.as_slice()).collect();
    let wanted_ders: Vec<&[u8]> = std::iter::once(ca.info.der.as_slice())
        .chain(previous.iter().map(|c| c.der.as_slice()))
        .collect();
    let ca_crt = if stored_ders == wanted_ders {
        stored.ca_crt.clone()
    } else {
        if changes.is_empty() {
            changes.push(Change::PreviousCaDropped {
                count: stored_ders.len().saturating_sub(wanted_ders.len()),
            });
        }
        let mut text = ca.cert_pem.clone();
        for cert in &previous {
            text.push_str(&encode_cert(&cert.der));
        }
        text
    };

    let switch_at = ca.info.not_before + CLOCK_SKEW + policy.ca_overlap / 2;
    let (tls_crt, tls_key) = match serving_reason(stored, &ca, &previous, switch_at, policy, now) {
        None => (stored.tls_crt.clone(), stored.tls_key.clone()),
        Some(reason) => {
            changes.push(Change::ServingIssued(reason));
            issue_serving(policy, &ca, now)?
        }
    };

    Ok(Plan {
        material: Material {
            tls_crt,
            tls_key,
            ca_crt,
            ca_key: ca.key_pem,
        },
        changes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            dns_names: Policy::service_dns_names("inj", "ns1", "cluster.local"),
            common_name: "inj.ns1.svc".into(),
            ca_name: "inj-ca".into(),
            ca_validity: Duration::days(3650),
            serving_validity: Duration::days(365),
            renew_fraction: 1.0 / 3.0,
            ca_overlap: Duration::hours(24),
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn one_cert(pem_text: &str) -> CertInfo {
        let mut certs = parse_bundle(pem_text.as_bytes()).expect("bundle parses");
        assert_eq!(certs.len(), 1);
        certs.remove(0)
    }

    #[test]
    fn dns_names_cover_every_service_form() {
        assert_eq!(
            Policy::service_dns_names("svc", "ns", "cluster.local."),
            ["svc", "svc.ns", "svc.ns.svc", "svc.ns.svc.cluster.local"]
        );
        assert_eq!(
            Policy::service_dns_names("svc", "ns", ""),
            ["svc", "svc.ns", "svc.ns.svc"]
        );
    }

    #[test]
    fn first_plan_issues_a_ca_and_a_serving_certificate() {
        let t = now();
        let plan = plan(None, &policy(), t).unwrap();
        assert_eq!(
            plan.changes,
            [
                Change::CaIssued(Reason::Missing),
                Change::ServingIssued(Reason::Missing)
            ]
        );
        let m = &plan.material;
        let ca = one_cert(&m.ca_crt);
        let leaf = one_cert(&m.tls_crt);
        assert!(ca.is_ca);
        assert!(!leaf.is_ca);
        assert!(signed_by(&leaf.der, &ca.der));
        assert_eq!(leaf.dns_names, policy().dns_names);
        assert!(leaf.not_before <= t && leaf.not_after > t + Duration::days(364));
        assert!(ca.not_after > t + Duration::days(3649));
        assert_eq!(
            KeyPair::from_pem(&m.tls_key).unwrap().public_key_raw(),
            leaf.public_key.as_slice()
        );
        assert_eq!(
            KeyPair::from_pem(&m.ca_key).unwrap().public_key_raw(),
            ca.public_key.as_slice()
        );
    }

    #[test]
    fn fresh_material_is_kept_byte_for_byte() {
        let t = now();
        let first = plan(None, &policy(), t).unwrap().material;
        // Half a day and two thirds of the serving lifetime minus a day: nothing is due.
        for later in [Duration::hours(12), Duration::days(242)] {
            let again = plan(Some(&first), &policy(), t + later).unwrap();
            assert!(again.is_unchanged(), "{later}: {:?}", again.changes);
            assert_eq!(again.material, first);
        }
    }

    #[test]
    fn serving_certificate_is_renewed_with_the_same_ca() {
        let t = now();
        let first = plan(None, &policy(), t).unwrap().material;
        // 365 days of lifetime: a third (121.7 days) is left after about 243.3 days.
        let later = t + Duration::days(244);
        let renewed = plan(Some(&first), &policy(), later).unwrap();
        assert!(matches!(
            renewed.changes.as_slice(),
            [Change::ServingIssued(Reason::RenewalDue { .. })]
        ));
        let m = &renewed.material;
        assert_eq!(m.ca_crt, first.ca_crt);
        assert_eq!(m.ca_key, first.ca_key);
        assert_ne!(m.tls_crt, first.tls_crt);
        assert_ne!(m.tls_key, first.tls_key);
        let leaf = one_cert(&m.tls_crt);
        assert!(signed_by(&leaf.der, &one_cert(&first.ca_crt).der));
        assert!(leaf.not_before <= later);
    }

    #[test]
    fn ca_rotation_keeps_the_old_ca_during_the_overlap_only() {
        let t = now();
        let issued = plan(None, &policy(), t).unwrap().material;
        // A serving certificate the old CA issued shortly before the CA is due.
        let first = plan(Some(&issued), &policy(), t + Duration::days(2430))
            .unwrap()
            .material;
        assert_eq!(first.ca_crt, issued.ca_crt);
        let old_ca = one_cert(&first.ca_crt);
        // 3650 days of CA lifetime: due after about 2433 days.
        let rotation = t + Duration::days(2440);
        let rotated = plan(Some(&first), &policy(), rotation).unwrap();
        // First only the bundle changes: clients learn the new CA while the server still
        // presents the old CA's certificate.
        assert!(matches!(
            rotated.changes.as_slice(),
            [Change::CaIssued(Reason::RenewalDue { .. })]
        ));
        let bundle = parse_bundle(rotated.material.ca_crt.as_bytes()).unwrap();
        assert_eq!(bundle.len(), 2);
        assert_ne!(bundle[0].der, old_ca.der);
        assert_eq!(bundle[1].der, old_ca.der);
        assert_eq!(rotated.material.tls_crt, first.tls_crt);
        let early = plan(
            Some(&rotated.material),
            &policy(),
            rotation + Duration::hours(11),
        )
        .unwrap();
        assert!(early.is_unchanged(), "{:?}", early.changes);

        // Half-way through the overlap the server switches to the new CA, while the
        // bundle still trusts both.
        let switched = plan(
            Some(&rotated.material),
            &policy(),
            rotation + Duration::hours(13),
        )
        .unwrap();
        assert_eq!(switched.changes, [Change::ServingIssued(Reason::NewCa)]);
        assert_eq!(switched.material.ca_crt, rotated.material.ca_crt);
        assert!(signed_by(
            &one_cert(&switched.material.tls_crt).der,
            &bundle[0].der
        ));

        // Within the overlap nothing else changes; after it the old CA leaves the bundle.
        let during = plan(
            Some(&switched.material),
            &policy(),
            rotation + Duration::hours(23),
        )
        .unwrap();
        assert!(during.is_unchanged(), "{:?}", during.changes);
        let after = plan(
            Some(&switched.material),
            &policy(),
            rotation + Duration::hours(25),
        )
        .unwrap();
        assert_eq!(after.changes, [Change::PreviousCaDropped { count: 1 }]);
        let bundle_after = parse_bundle(after.material.ca_crt.as_bytes()).unwrap();
        assert_eq!(bundle_after.len(), 1);
        assert_eq!(bundle_after[0].der, bundle[0].der);
        assert_eq!(after.material.tls_crt, switched.material.tls_crt);

        // A run that comes only after the whole overlap (a daily CronJob that missed a
        // day) switches and drops in one go.
        let late = plan(
            Some(&rotated.material),
            &policy(),
            rotation + Duration::hours(30),
        )
        .unwrap();
        assert_eq!(
            late.changes,
            [
                Change::PreviousCaDropped { count: 1 },
                Change::ServingIssued(Reason::NewCa)
            ]
        );
    }

    #[test]
    fn unusable_contents_are_replaced() {
        let t = now();
        let good = plan(None, &policy(), t).unwrap().material;
        let other = plan(None, &policy(), t).unwrap().material;

        let cases: Vec<(&str, Material, bool)> = vec![
            (
                "garbage CA key",
                Material {
                    ca_key: "not a key".into(),
                    ..good.clone()
                },
                true,
            ),
            (
                "CA key of another CA",
                Material {
                    ca_key: other.ca_key.clone(),
                    ..good.clone()
                },
                true,
            ),
            (
                "garbage bundle",
                Material {
                    ca_crt: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
                    ..good.clone()
                },
                true,
            ),
            (
                "serving key of another certificate",
                Material {
                    tls_key: other.tls_key.clone(),
                    ..good.clone()
                },
                false,
            ),
            (
                "serving certificate from another CA",
                Material {
                    tls_crt: other.tls_crt.clone(),
                    tls_key: other.tls_key.clone(),
                    ..good.clone()
                },
                false,
            ),
            (
                "empty serving certificate",
                Material {
                    tls_crt: String::new(),
                    ..good.clone()
                },
                false,
            ),
        ];
        for (name, stored, new_ca) in cases {
            let p = plan(Some(&stored), &policy(), t).unwrap();
            let ca_issued = p
                .changes
                .iter()
                .any(|c| matches!(c, Change::CaIssued(Reason::Unusable(_))));
            assert_eq!(ca_issued, new_ca, "{name}: {:?}", p.changes);
            let bundle = parse_bundle(p.material.ca_crt.as_bytes()).unwrap();
            let leaf = one_cert(&p.material.tls_crt);
            if new_ca {
                // A usable certificate of the old CA, which stays in the bundle, is kept
                // until half-way through the overlap, like after any CA rotation.
                assert!(
                    bundle.iter().any(|ca| signed_by(&leaf.der, &ca.der)),
                    "{name}: the serving certificate is trusted"
                );
            } else {
                assert!(
                    p.changes
                        .iter()
                        .any(|c| matches!(c, Change::ServingIssued(_))),
                    "{name}: {:?}",
                    p.changes
                );
                assert!(signed_by(&leaf.der, &bundle[0].der), "{name}");
            }
            // The result is stable: planning again changes nothing.
            assert!(
                plan(Some(&p.material), &policy(), t)
                    .unwrap()
                    .is_unchanged(),
                "{name}"
            );
        }
    }

    #[test]
    fn changed_dns_names_reissue_the_serving_certificate() {
        let t = now();
        let first = plan(None, &policy(), t).unwrap().material;
        let moved = Policy {
            dns_names: Policy::service_dns_names("inj", "other-ns", "cluster.local"),
            ..policy()
        };
        let p = plan(Some(&first), &moved, t).unwrap();
        assert_eq!(p.changes, [Change::ServingIssued(Reason::NamesChanged)]);
        assert_eq!(one_cert(&p.material.tls_crt).dns_names, moved.dns_names);
    }

    #[test]
    fn serving_certificate_never_outlives_its_ca() {
        let short_ca = Policy {
            ca_validity: Duration::days(30),
            ..policy()
        };
        let m = plan(None, &short_ca, now()).unwrap().material;
        assert_eq!(
            one_cert(&m.tls_crt).not_after,
            one_cert(&m.ca_crt).not_after
        );
    }

    #[test]
    fn renewal_threshold_is_the_fraction_of_the_lifetime() {
        let nb = OffsetDateTime::UNIX_EPOCH;
        let na = nb + Duration::days(300);
        assert!(!renewal_due(nb, na, nb + Duration::days(199), 1.0 / 3.0));
        assert!(renewal_due(nb, na, nb + Duration::days(201), 1.0 / 3.0));
        assert!(renewal_due(nb, na, na + Duration::days(1), 1.0 / 3.0));
    }

    #[test]
    fn bad_settings_are_rejected() {
        for bad in [
            Policy {
                renew_fraction: 1.0,
                ..policy()
            },
            Policy {
                renew_fraction: 0.0,
                ..policy()
            },
            Policy {
                serving_validity: Duration::minutes(1),
                ..policy()
            },
            Policy {
                dns_names: vec![],
                ..policy()
            },
        ] {
            assert!(matches!(plan(None, &bad, now()), Err(Error::Settings(_))));
        }
    }

    #[test]
    fn material_debug_hides_keys() {
        let m = plan(None, &policy(), now()).unwrap().material;
        let shown = format!("{m:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    }
}
