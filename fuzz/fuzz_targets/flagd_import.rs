//! flagd flag-definition documents with `$evaluators` and `$ref`: any text is parsed,
//! expanded and validated, strictly and skipping invalid flags, within the expansion
//! budgets; every flag that is accepted becomes a feature.
#![no_main]

use libfuzzer_sys::fuzz_target;
use release_svc::domain::flagd_doc;

fuzz_target!(|data: &[u8]| {
    let Ok(document) = std::str::from_utf8(data) else {
        return;
    };
    let _ = flagd_doc::parse(document, false);
    if let Ok(parsed) = flagd_doc::parse(document, true) {
        for flag in &parsed.flags {
            let _ = flag.to_feature(None);
        }
    }
});
