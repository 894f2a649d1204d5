//! Master key handling: rotation, a wrong key refused at start, keys required on PostgreSQL.

use postwire_tests::{Backend, Setup, dual_test, m365_password_settings};

fn with_key(setup: &Setup, spec: &str) -> Setup {
    let mut s = setup.clone();
    s.env.insert("POSTWIRE_MASTER_KEY".into(), spec.into());
    s
}

async fn rotation_and_wrong_key(b: Backend) {
    let base = Setup::new(b).await;
    let (k1, k2, wrong) = (
        mail_core::crypto::generate_key_b64(),
        mail_core::crypto::generate_key_b64(),
        mail_core::crypto::generate_key_b64(),
    );
    let old = with_key(&base, &format!("old:{k1}"));
    {
        let app = old.spawn().await;
        app.create_tenant("acme").await;
        let t = app.admin_token("acme");
        assert_eq!(
            app.put(
                "/api/v1/tenants/acme/email-settings",
                &t,
                &m365_password_settings()
            )
            .await
            .status,
            200
        );
    }
    // a key that cannot decrypt the check value is refused before anything is written
    let err = with_key(&base, &wrong)
        .try_spawn(std::sync::Arc::new(management::clock::SystemClock))
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{err:#}").contains("POSTWIRE_MASTER_KEY"),
        "{err:#}"
    );

    // rotate: new key first, old key still listed
    let both = with_key(&base, &format!("new:{k2},old:{k1}"));
    {
        let app = both.spawn().await;
        let n = app.state.store.rotate_keys().await.unwrap();
        assert_eq!(n, 1, "one secret re-encrypted");
    }
    // after rotation the old key can go
    let new_only = with_key(&base, &format!("new:{k2}"));
    let app = new_only.spawn().await;
    let acme = mail_core::domain::TenantId::parse("acme").unwrap();
    use secrecy::ExposeSecret;
    let pw = app
        .state
        .store
        .settings_password(&acme)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pw.expose_secret(), "Sup3r-Secret-PW");
    let row = app
        .query_one("SELECT password_ct FROM email_settings")
        .await
        .unwrap();
    let ct: Vec<u8> = row.try_get("", "password_ct").unwrap();
    assert_eq!(&ct[2..5], b"new", "stored under the new key id");
    // and the old key alone no longer starts
    let err = with_key(&base, &format!("old:{k1}"))
        .try_spawn(std::sync::Arc::new(management::clock::SystemClock))
        .await
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("POSTWIRE_MASTER_KEY"));
}
dual_test!(rotation_and_wrong_key);

#[tokio::test]
async fn postgres_requires_configured_keys() {
    let base = Setup::new(Backend::Postgres).await;
    for var in [
        "POSTWIRE_MASTER_KEY",
        "POSTWIRE_CACHE_KEY",
        "POSTWIRE_JWT_SECRET",
    ] {
        let mut s = base.clone();
        s.env.remove(var);
        let err = s
            .try_spawn(std::sync::Arc::new(management::clock::SystemClock))
            .await
            .err()
            .expect("refused");
        assert!(format!("{err:#}").contains(var), "{err:#}");
        assert!(
            !s.data_dir.join("master.key").exists(),
            "nothing generated on PostgreSQL"
        );
    }
}

#[tokio::test]
async fn sqlite_generates_keys_once_and_reuses_them() {
    let s = Setup::new(Backend::Sqlite).await;
    let app = s.spawn().await;
    app.create_tenant("acme").await;
    let t = app.admin_token("acme");
    assert_eq!(
        app.put(
            "/api/v1/tenants/acme/email-settings",
            &t,
            &m365_password_settings()
        )
        .await
        .status,
        200
    );
    let key = std::fs::read_to_string(s.data_dir.join("master.key")).unwrap();
    drop(app);
    let again = s.spawn().await;
    assert_eq!(
        std::fs::read_to_string(s.data_dir.join("master.key")).unwrap(),
        key
    );
    // tokens signed before the restart still verify (same generated JWT secret)
    assert_eq!(
        again
            .get("/api/v1/tenants/acme/email-settings", &t)
            .await
            .status,
        200
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.data_dir.join("master.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
