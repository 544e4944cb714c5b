//! `kafka-mock`: starts librdkafka's in-process mock cluster (a real Kafka protocol endpoint on
//! loopback) with the given topics, prints its bootstrap address on the first line of stdout,
//! and serves until it is interrupted (SIGINT/SIGTERM) or its standard input closes.
//!
//! ```text
//! kafka-mock --topic events:4 --topic other:1 [--brokers 1]
//! ```
//!
//! Quirks (DESIGN.md): about 5 MiB kept per partition, commits rejected during a rebalance,
//! transactions partly emulated, a 3 s initial group rebalance delay.

use std::io::Read;
use std::process::ExitCode;

use rdkafka::mocking::MockCluster;

fn usage() -> ExitCode {
    eprintln!("usage: kafka-mock --topic NAME[:PARTITIONS] [--topic ...] [--brokers N]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut topics = Vec::new();
    let mut brokers = 1;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--topic" => {
                let Some(t) = args.next() else { return usage() };
                let (name, parts) = match t.split_once(':') {
                    Some((n, p)) => match p.parse::<i32>() {
                        Ok(p) if p > 0 => (n.to_string(), p),
                        _ => {
                            eprintln!("kafka-mock: invalid partition count in {t:?}");
                            return ExitCode::from(2);
                        }
                    },
                    None => (t.clone(), 1),
                };
                if name.is_empty() {
                    return usage();
                }
                topics.push((name, parts));
            }
            "--brokers" => match args.next().and_then(|b| b.parse::<i32>().ok()) {
                Some(b) if b > 0 => brokers = b,
                _ => return usage(),
            },
            "--help" | "-h" => {
                println!("kafka-mock --topic NAME[:PARTITIONS] [--topic ...] [--brokers N]\nPrints the bootstrap address, then serves until interrupted or stdin closes.");
                return ExitCode::SUCCESS;
            }
            _ => return usage(),
        }
    }
    let cluster = match MockCluster::new(brokers) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kafka-mock: cannot start the mock cluster: {e}");
            return ExitCode::from(1);
        }
    };
    for (name, parts) in &topics {
        if let Err(e) = cluster.create_topic(name, *parts, 1) {
            eprintln!("kafka-mock: cannot create topic {name}: {e}");
            return ExitCode::from(1);
        }
    }
    println!("{}", cluster.bootstrap_servers());
    eprintln!(
        "kafka-mock: {} broker(s), topics {:?}; serving until interrupted or stdin closes",
        brokers, topics
    );
    // Serve until stdin reaches EOF (or the process is signalled, which ends it anyway).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    ExitCode::SUCCESS
}
