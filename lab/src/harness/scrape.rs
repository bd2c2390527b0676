//! Scrapes every node's `--metrics` endpoint while a run goes, a few times a second; a node
//! that is down (killed, stopped) simply has no row for that moment.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::report::MetricsRow;

/// How often each node is scraped.
pub const EVERY: Duration = Duration::from_millis(250);

async fn get(addr: &str) -> Option<String> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: edgepair\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        Some(text)
    };
    tokio::time::timeout(Duration::from_millis(500), fetch)
        .await
        .ok()
        .flatten()
}

/// Every [`EVERY`], asks each of `nodes` (name, address) with `read`; the rows it returns
/// collect in the returned list until the task is aborted. A node that does not answer has no
/// row for that moment.
fn poll<R, F, Fut>(
    nodes: Vec<(&'static str, String)>,
    read: F,
) -> (Arc<Mutex<Vec<R>>>, tokio::task::JoinHandle<()>)
where
    R: Send + 'static,
    F: Fn(&'static str, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Vec<R>> + Send,
{
    let rows = Arc::new(Mutex::new(Vec::new()));
    let out = rows.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tick.tick().await;
            for (name, addr) in &nodes {
                let got = read(name, addr.clone()).await;
                if let Ok(mut g) = out.lock() {
                    g.extend(got);
                }
            }
        }
    });
    (rows, task)
}

/// Starts scraping `nodes` (name, metrics address) for their metrics.
pub fn start(
    nodes: Vec<(&'static str, String)>,
) -> (Arc<Mutex<Vec<MetricsRow>>>, tokio::task::JoinHandle<()>) {
    poll(nodes, |name, addr| async move {
        let Some(text) = get(&addr).await else {
            return Vec::new();
        };
        MetricsRow::parse(edgepair::clock::now_us(), name, &text)
            .into_iter()
            .collect()
    })
}

/// Asks `nodes` (name, address) for the groups of `topic` (`GROUP|list|TOPIC`).
pub fn start_groups(
    nodes: Vec<(&'static str, String)>,
    topic: String,
) -> (
    Arc<Mutex<Vec<crate::report::GroupRow>>>,
    tokio::task::JoinHandle<()>,
) {
    use edgepair::protocol::{Frame, GroupOp};
    poll(nodes, move |name, addr| {
        let ask = Frame::Group(GroupOp::List {
            topic: Some(topic.clone()),
        });
        async move {
            let Ok(Ok(answers)) = tokio::time::timeout(
                Duration::from_millis(500),
                crate::procs::request_until(&addr, ask, |f| {
                    matches!(f, Frame::Group(GroupOp::End))
                }),
            )
            .await
            else {
                return Vec::new();
            };
            let at = edgepair::clock::now_us();
            answers
                .into_iter()
                .filter_map(|f| match f {
                    Frame::Group(GroupOp::Info { info, .. }) => Some(crate::report::GroupRow {
                        at_us: at,
                        node: name.to_string(),
                        floor: info.floor,
                        end: info.end,
                        pending: info.pending,
                        lag: info.lag,
                        redelivered: info.redelivered,
                        dead: info.dead,
                        members: info.members.len() as u64,
                    }),
                    _ => None,
                })
                .collect()
        }
    })
}
