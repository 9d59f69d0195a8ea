//! The servers the tests need: RabbitMQ, Redis and PostgreSQL. Each is used where it is
//! configured (`RELAY_TEST_AMQP_URL`, `RELAY_TEST_REDIS_URL`, `RELAY_TEST_PG_URL`, or the
//! usual local port) when something answers there; otherwise the harness starts its own on
//! free ports, with its data under a temporary directory, shared by the whole test binary and
//! stopped when the test binary exits (a watchdog shell ends it once this process is gone).
//! A server program that is not installed fails the tests that need it with one line naming
//! the Debian package to install; nothing is skipped.

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where one server answers, or why it cannot.
#[derive(Debug, Clone)]
pub struct Server {
    pub url: String,
    /// The RabbitMQ node the harness started (`rabbitmqctl -n NODE ...`), if it did.
    pub node: Option<String>,
}

pub fn rabbitmq() -> &'static Server {
    static S: OnceLock<Result<Server, String>> = OnceLock::new();
    ready_or_panic(S.get_or_init(|| {
        let url = env_or(
            "RELAY_TEST_AMQP_URL",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        );
        if answers(&address_of(&url)) {
            return Ok(Server { url, node: None });
        }
        start_rabbitmq()
    }))
}

pub fn redis() -> &'static Server {
    static S: OnceLock<Result<Server, String>> = OnceLock::new();
    ready_or_panic(S.get_or_init(|| {
        let url = env_or("RELAY_TEST_REDIS_URL", "redis://127.0.0.1:6379");
        if answers(&address_of(&url)) {
            return Ok(Server { url, node: None });
        }
        start_redis()
    }))
}

pub fn postgres() -> &'static Server {
    static S: OnceLock<Result<Server, String>> = OnceLock::new();
    ready_or_panic(S.get_or_init(|| {
        let url = env_or(
            "RELAY_TEST_PG_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        );
        if answers(&address_of(&url)) {
            return Ok(Server { url, node: None });
        }
        start_postgres()
    }))
}

/// `rabbitmqctl` aimed at the broker the tests use.
pub fn rabbitmqctl() -> Command {
    let mut cmd = Command::new("rabbitmqctl");
    if let Some(node) = &rabbitmq().node {
        cmd.args(["-n", node]);
    }
    cmd
}

fn ready_or_panic(result: &'static Result<Server, String>) -> &'static Server {
    match result {
        Ok(server) => server,
        Err(why) => panic!("{why}"),
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// `host:port` of `scheme://[user[:pass]@]host:port[/...]`.
pub fn address_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}

fn answers(address: &str) -> bool {
    address
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
}

/// The path of `program`, or the one-line instruction to install its Debian package.
pub fn find_program(program: &str, package: &str) -> Result<PathBuf, String> {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain(["/usr/sbin", "/usr/lib/rabbitmq/bin"].map(PathBuf::from))
        .chain(postgres_bin_dirs())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!("`{program}` is not installed and nothing answers where the tests look: apt-get install {package}")
        })
}

fn postgres_bin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.reverse();
    dirs
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A directory for one server's data that outlives this function (removed by the watchdog).
fn data_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-tests-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a data directory");
    dir
}

/// Run `command` (a shell command line) in the background until this process exits: a
/// watchdog shell polls our pid, then runs `stop` and removes `dir`.
fn run_while_we_live(command: &str, stop: &str, dir: &Path, env: &[(&str, String)]) {
    let script = format!(
        "{command} & server=$!\n\
         while kill -0 {me} 2>/dev/null && kill -0 $server 2>/dev/null; do sleep 1; done\n\
         {stop}\n\
         kill $server 2>/dev/null; wait $server 2>/dev/null\n\
         rm -rf '{dir}'",
        me = std::process::id(),
        dir = dir.display()
    );
    let child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a test server");
    // Not waited for: the watchdog outlives this call by design and ends with this process.
    drop(child);
}

fn wait_until_answering(
    name: &str,
    address: &str,
    limit: Duration,
    log: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !answers(address) {
        if Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(10).collect();
            return Err(format!(
                "the {name} the tests started does not answer at {address}; its log ends: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ));
        }
        std::thread::sleep(Duration::from_millis(100)); // poll with deadline
    }
    Ok(())
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Hand `dir` to the service user a server program switches to.
fn give_to(user: &str, dir: &Path) {
    let _ = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:{user}"))
        .arg(dir)
        .status();
}

pub fn start_redis() -> Result<Server, String> {
    let program = find_program("redis-server", "redis-server")?;
    let port = free_port();
    let dir = data_dir("redis");
    let log = dir.join("redis.log");
    let command = format!(
        "'{}' --port {port} --bind 127.0.0.1 --save '' --appendonly no --dir '{}' --logfile '{}'",
        program.display(),
        dir.display(),
        log.display()
    );
    run_while_we_live(&command, "", &dir, &[]);
    let address = format!("127.0.0.1:{port}");
    wait_until_answering("Redis", &address, Duration::from_secs(20), &log)?;
    Ok(Server {
        url: format!("redis://{address}"),
        node: None,
    })
}

pub fn start_rabbitmq() -> Result<Server, String> {
    let server = find_program("rabbitmq-server", "rabbitmq-server")?;
    let ctl = find_program("rabbitmqctl", "rabbitmq-server")?;
    let (port, dist) = (free_port(), free_port());
    let dir = data_dir("rabbitmq");
    let node = format!("relaytests{}-{port}@localhost", std::process::id());
    let plugins = dir.join("enabled_plugins");
    std::fs::write(&plugins, "[].\n").expect("write enabled_plugins");
    for sub in ["mnesia", "log"] {
        std::fs::create_dir_all(dir.join(sub)).expect("a RabbitMQ data directory");
    }
    // Debian's `rabbitmq-server` switches to the `rabbitmq` user when started as root.
    if running_as_root() {
        give_to("rabbitmq", &dir);
    }
    let env = [
        ("RABBITMQ_NODENAME", node.clone()),
        ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_owned()),
        ("RABBITMQ_NODE_PORT", port.to_string()),
        ("RABBITMQ_DIST_PORT", dist.to_string()),
        (
            "RABBITMQ_MNESIA_BASE",
            dir.join("mnesia").display().to_string(),
        ),
        ("RABBITMQ_LOG_BASE", dir.join("log").display().to_string()),
        (
            "RABBITMQ_PID_FILE",
            dir.join("rabbit.pid").display().to_string(),
        ),
        (
            "RABBITMQ_ENABLED_PLUGINS_FILE",
            plugins.display().to_string(),
        ),
        (
            "RABBITMQ_CONFIG_FILE",
            dir.join("rabbitmq").display().to_string(),
        ),
    ];
    let stop = format!("'{}' -n {node} stop >/dev/null 2>&1", ctl.display());
    run_while_we_live(&format!("'{}'", server.display()), &stop, &dir, &env);
    let address = format!("127.0.0.1:{port}");
    wait_until_answering(
        "RabbitMQ",
        &address,
        Duration::from_secs(90),
        &dir.join("log").join(format!("{node}.log")),
    )?;
    Ok(Server {
        url: format!("amqp://guest:guest@{address}/%2f"),
        node: Some(node),
    })
}

pub fn start_postgres() -> Result<Server, String> {
    let initdb = find_program("initdb", "postgresql")?;
    let postgres = find_program("postgres", "postgresql")?;
    let port = free_port();
    let dir = data_dir("postgres");
    let data = dir.join("data");
    let log = dir.join("postgres.log");
    // PostgreSQL refuses to run as root: as root, its files belong to the `postgres` user.
    let root = running_as_root();
    let as_user = |program: &Path| -> String {
        if root {
            format!("runuser -u postgres -- '{}'", program.display())
        } else {
            format!("'{}'", program.display())
        }
    };
    if root {
        give_to("postgres", &dir);
    }
    let init = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} -D '{}' -U postgres --auth=trust >'{}' 2>&1",
            as_user(&initdb),
            data.display(),
            log.display()
        ))
        .status()
        .map_err(|e| format!("running initdb: {e}"))?;
    if !init.success() {
        return Err(format!(
            "initdb failed: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ));
    }
    let command = format!(
        "{} -D '{}' -p {port} -k '{}' -c listen_addresses=127.0.0.1 -c fsync=off >>'{}' 2>&1",
        as_user(&postgres),
        data.display(),
        dir.display(),
        log.display()
    );
    run_while_we_live(&command, "", &dir, &[]);
    let address = format!("127.0.0.1:{port}");
    wait_until_answering("PostgreSQL", &address, Duration::from_secs(30), &log)?;
    Ok(Server {
        url: format!("postgres://postgres@{address}/postgres"),
        node: None,
    })
}

#[test]
fn a_missing_server_program_names_its_debian_package() {
    let err = find_program("no-such-server-program-3f9a", "no-such-package").unwrap_err();
    assert!(err.ends_with("apt-get install no-such-package"), "{err}");
    assert_eq!(address_of("amqp://u:p@h:5673/%2f"), "h:5673");
    assert_eq!(address_of("redis://h:6380"), "h:6380");
    assert_eq!(
        address_of("postgres://postgres@127.0.0.1:5432/postgres"),
        "127.0.0.1:5432"
    );
}

/// The harness's own servers work (CI has servers running, so this starts them on purpose).
#[tokio::test]
async fn the_harness_starts_its_own_redis_rabbitmq_and_postgresql() {
    let redis_server = tokio::task::spawn_blocking(start_redis)
        .await
        .unwrap()
        .unwrap();
    let client = redis::Client::open(redis_server.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");

    let rabbit = tokio::task::spawn_blocking(start_rabbitmq)
        .await
        .unwrap()
        .unwrap();
    let conn = lapin::Connection::connect(&rabbit.url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    conn.create_channel().await.unwrap();
    let _ = conn.close(200, "harness check").await;

    let pg = tokio::task::spawn_blocking(start_postgres)
        .await
        .unwrap()
        .unwrap();
    psql_select_1(&pg.url).await;
}

/// The PostgreSQL the tests use (configured, local, or the harness's own) answers.
#[tokio::test]
async fn the_tests_postgresql_answers() {
    let url = tokio::task::spawn_blocking(|| postgres().url.clone())
        .await
        .unwrap();
    psql_select_1(&url).await;
}

async fn psql_select_1(url: &str) {
    let psql = find_program("psql", "postgresql-client").unwrap();
    let out = tokio::process::Command::new(psql)
        .arg(url)
        .args(["-tAc", "SELECT 1"])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{out:?}");
}
