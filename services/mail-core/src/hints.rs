//! Plain advice for the failures users hit most, keyed by what the SMTP server or the token
//! endpoint says. Shown with test-email failures and in the runbook.

/// (marker in the reply or error, advice)
const HINTS: &[(&str, &str)] = &[
    (
        "5.7.139",
        "SMTP AUTH is disabled for this mailbox or the organization, or Security Defaults are on: enable Authenticated SMTP for the sending user (Microsoft 365 admin center > Users > Mail > Manage email apps) and turn off Security Defaults in Azure Active Directory.",
    ),
    (
        "5.7.3",
        "Authentication failed: the user may not be licensed for Exchange Online, or the username or password is wrong. Check the license and the credentials.",
    ),
    (
        "5.7.60",
        "The sender is not allowed: with Microsoft 365 only the authorized user can be the From address.",
    ),
    (
        "AADSTS700082",
        "The refresh token expired after a long inactivity: authorize again.",
    ),
    (
        "AADSTS50173",
        "The grant was revoked (for example after a password change or session revocation): authorize again.",
    ),
    (
        "AADSTS50076",
        "The organization requires multi-factor authentication for this sign-in (a Conditional Access policy changed or applies now): authorize again and complete the MFA prompt, or exclude the sending account from the policy.",
    ),
    (
        "AADSTS65001",
        "The user or an administrator has not consented to the app's permissions: authorize again and accept the consent prompt, or have an administrator grant consent for the organization in the app registration (API permissions).",
    ),
    (
        "AADSTS500112",
        "The redirect URI sent differs from the one of the authorization: authorize again from the address registered in the app registration.",
    ),
    (
        "AADSTS50011",
        "The redirect URI is not registered in the app registration: add exactly oauth.redirect_uri (mind http versus https).",
    ),
    (
        "AADSTS70011",
        "A requested scope is invalid: keep the preset's scopes (https://outlook.office.com/SMTP.Send openid profile offline_access).",
    ),
    (
        "AADSTS7000222",
        "The client secret expired: create a new one in the app registration and store it.",
    ),
    (
        "AADSTS7000215",
        "The client secret is wrong: copy the secret's Value (not its ID) from the app registration.",
    ),
    (
        "invalid_grant",
        "The provider refused the grant: authorize again. Google apps in testing mode lose their refresh tokens after 7 days.",
    ),
];

/// Advice for a reply or error text, if it is a known one.
pub fn hint(text: &str) -> Option<&'static str> {
    HINTS
        .iter()
        .find(|(marker, _)| text.contains(marker))
        .map(|(_, advice)| *advice)
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_failures_have_advice() {
        assert!(
            super::hint("535 5.7.139 Authentication unsuccessful")
                .unwrap()
                .contains("Security Defaults")
        );
        assert!(
            super::hint("535 5.7.3 Authentication unsuccessful")
                .unwrap()
                .contains("licensed")
        );
        assert!(
            super::hint("invalid_grant: AADSTS700082: expired")
                .unwrap()
                .contains("inactivity")
        );
        assert!(
            super::hint("invalid_grant: AADSTS50076: Due to a configuration change")
                .unwrap()
                .contains("multi-factor")
        );
        assert!(
            super::hint("invalid_grant: AADSTS65001: The user or administrator has not consented")
                .unwrap()
                .contains("consent")
        );
        assert!(super::hint("250 OK").is_none());
    }
}
