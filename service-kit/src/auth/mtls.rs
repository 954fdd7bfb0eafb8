//! The principal of a verified client certificate: its SPIFFE (or other) URI SAN, else
//! its first DNS SAN, else its subject's common name.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// The principal a client certificate names, `None` when it names none.
pub fn principal(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let names = &san.value.general_names;
        if let Some(uri) = names.iter().find_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        }) {
            return Some(uri.to_owned());
        }
        if let Some(dns) = names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        }) {
            return Some(dns.to_owned());
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    cn
}
