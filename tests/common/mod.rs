//! Helpers shared by integration tests.

use std::time::Duration;

use weir::StreamingContext;

/// Starts a context built by `ctx`, retrying while the data directory is still locked by an
/// engine dropped a moment ago (its last tasks end asynchronously).
pub async fn start(ctx: impl Fn() -> StreamingContext) -> weir::stream::RunningContext {
    for _ in 0..100 {
        match ctx().start().await {
            Ok(r) => return r,
            Err(e) if e.to_string().contains("ocked") => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("start: {e}"),
        }
    }
    panic!("the data directory stayed locked");
}
