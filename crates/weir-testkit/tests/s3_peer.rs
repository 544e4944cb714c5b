//! The S3 peer (`weir_testkit::peers::s3`, moto's server) honours the conditional writes that
//! object-store fencing relies on, through the client weir's replica uses (`object_store`):
//! create-if-absent fails once the object exists, replace-if-this-version fails once it has
//! changed, and of many writers racing for one new name exactly one wins. Named `real_s3_*` so
//! that `cargo test -- --skip real_` leaves them out with the other real-peer tests.

use std::sync::Arc;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{Error, ObjectStore, ObjectStoreExt, PutMode, PutOptions, UpdateVersion};
use weir_testkit::peers::s3::{self, ACCESS_KEY, REGION, SECRET_KEY};

/// A client of a new bucket on the shared server.
fn bucket(name: &str) -> AmazonS3 {
    let server = s3::shared();
    server.create_bucket(name);
    AmazonS3Builder::new()
        .with_endpoint(server.endpoint())
        .with_allow_http(true)
        .with_bucket_name(name)
        .with_region(REGION)
        .with_access_key_id(ACCESS_KEY)
        .with_secret_access_key(SECRET_KEY)
        .build()
        .expect("an S3 client")
}

async fn put(
    store: &AmazonS3,
    key: &str,
    body: &'static str,
    mode: PutMode,
) -> Result<UpdateVersion, Error> {
    store
        .put_opts(&Path::from(key), body.into(), PutOptions::from(mode))
        .await
        .map(UpdateVersion::from)
}

async fn read(store: &AmazonS3, key: &str) -> String {
    let body = store
        .get(&Path::from(key))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_s3_create_if_absent_and_replace_if_unchanged_are_refused_once_the_object_moved() {
    let _logs = s3::shared().logs_on_failure();
    let store = bucket("conditional");

    let first = put(&store, "manifest", "epoch 1", PutMode::Create)
        .await
        .unwrap();
    let again = put(&store, "manifest", "epoch 1 again", PutMode::Create).await;
    assert!(
        matches!(again, Err(Error::AlreadyExists { .. })),
        "{again:?}"
    );
    assert_eq!(read(&store, "manifest").await, "epoch 1");

    // Replacing the version we read succeeds once; the old version no longer matches.
    let second = put(
        &store,
        "manifest",
        "epoch 2",
        PutMode::Update(first.clone()),
    )
    .await
    .unwrap();
    let stale = put(
        &store,
        "manifest",
        "epoch 2 by a zombie",
        PutMode::Update(first),
    )
    .await;
    assert!(
        matches!(stale, Err(Error::Precondition { .. })),
        "{stale:?}"
    );
    assert_eq!(read(&store, "manifest").await, "epoch 2");
    put(&store, "manifest", "epoch 3", PutMode::Update(second))
        .await
        .unwrap();
    assert_eq!(read(&store, "manifest").await, "epoch 3");

    // Replacing an object that does not exist is refused too.
    let missing = UpdateVersion {
        e_tag: Some("\"0123456789abcdef0123456789abcdef\"".into()),
        version: None,
    };
    let r = put(&store, "nothing-here", "x", PutMode::Update(missing)).await;
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_s3_of_writers_racing_to_create_one_name_exactly_one_wins() {
    let _logs = s3::shared().logs_on_failure();
    let store = Arc::new(bucket("race"));
    for round in 0..20 {
        let key = format!("log/{round:020}");
        let writers: Vec<_> = (0..16)
            .map(|w| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move {
                    let body = format!("writer {w}");
                    let r = store
                        .put_opts(
                            &Path::from(key),
                            body.clone().into(),
                            PutMode::Create.into(),
                        )
                        .await;
                    (body, r)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for w in writers {
            match w.await.unwrap() {
                (body, Ok(_)) => winners.push(body),
                (_, Err(Error::AlreadyExists { .. })) => {}
                (_, Err(e)) => panic!("round {round}: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        // And the object holds the winner's bytes, not a loser's.
        assert_eq!(read(&store, &key).await, winners[0], "round {round}");
    }
}
