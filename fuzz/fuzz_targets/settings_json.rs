//! Settings JSON → domain: the body of `PUT .../email-settings` parsed as the API parses it
//! (`mail_core::http::parse_json`) and converted with `EmailSettingsRequest::validate`.
//!
//! Beyond "never panics": settings that are accepted survive the GET → edit → PUT round trip
//! the API promises (ARCHITECTURE §5): their GET shape parses as a PUT body, is accepted
//! against the stored state, and yields the same settings.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_core::http::parse_json;
use mail_core::settings::{EmailSettingsRequest, SecretAction, StoredState};

fuzz_target!(|data: &[u8]| {
    let Ok(request) = parse_json::<EmailSettingsRequest>(data) else {
        return;
    };
    let Ok(change) = request.validate(&StoredState::default()) else {
        return;
    };
    let password_set = matches!(change.password, SecretAction::Set(_));
    let client_secret_set = matches!(change.client_secret, SecretAction::Set(_));
    let view = change.settings.view(password_set, client_secret_set);
    let get_shape = serde_json::to_vec(&view).expect("the view serializes");

    let again = parse_json::<EmailSettingsRequest>(&get_shape)
        .unwrap_or_else(|e| panic!("the GET shape is not a valid PUT body: {e:?}"));
    let stored = StoredState {
        settings: Some(&change.settings),
        password_set,
        client_secret_set,
    };
    let second = again
        .validate(&stored)
        .unwrap_or_else(|e| panic!("the GET shape of accepted settings is refused: {e:?}"));
    // A secret the method does not use is cleared (nothing was stored), a used one is kept:
    // never replaced, never lost.
    let kept = |action: &SecretAction, was_set: bool| match action {
        SecretAction::Keep => was_set,
        SecretAction::Clear => !was_set,
        SecretAction::Set(_) => false,
    };
    assert!(
        kept(&second.password, password_set) && kept(&second.client_secret, client_secret_set),
        "a round trip must leave the stored secrets as they are: {:?} {:?}",
        second.password,
        second.client_secret
    );
    let view_again =
        serde_json::to_vec(&second.settings.view(password_set, client_secret_set)).expect("view");
    assert_eq!(
        String::from_utf8_lossy(&get_shape),
        String::from_utf8_lossy(&view_again),
        "a round trip changed the settings"
    );
});
