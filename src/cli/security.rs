//! `fedrec certs`, `fedrec tokens` and `fedrec privacy`: credentials and privacy budgets.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

#[derive(Args, Debug)]
pub(crate) struct CertsArgs {
    /// Directory to write ca.pem, server.pem/.key and device-N.pem/.key into
    /// (created if needed; existing files are replaced).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Device certificates to make (device-1 … device-N).
    #[arg(long, value_name = "N", default_value_t = fedrec::certs::DEFAULT_DEVICES)]
    pub(crate) devices: usize,
    /// Days the certificates stay valid.
    #[arg(long, value_name = "D", default_value_t = fedrec::certs::DEFAULT_DAYS)]
    pub(crate) days: u32,
    /// The coordinator's names (DNS names or IP addresses), comma separated:
    /// devices must connect by one of them.
    #[arg(long, value_name = "NAME,...", value_delimiter = ',', default_values_t = fedrec::certs::DEFAULT_SANS.map(String::from))]
    pub(crate) san: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct PrivacyArgs {
    /// Probability that a device is in a round's cohort.
    #[arg(long)]
    pub(crate) sampling_rate: f64,
    /// Rounds of training.
    #[arg(long)]
    pub(crate) rounds: u64,
    /// Target delta (e.g. below 1 / number of users).
    #[arg(long)]
    pub(crate) delta: f64,
    /// Noise standard deviation over the clipping norm; prints epsilon.
    #[arg(long, conflicts_with = "epsilon", required_unless_present = "epsilon")]
    pub(crate) noise_multiplier: Option<f64>,
    /// Privacy budget; prints the noise multiplier needed.
    #[arg(long)]
    pub(crate) epsilon: Option<f64>,
}

#[derive(Args, Debug)]
pub(crate) struct TokensArgs {
    /// Directory to write device-N.token and enrollment-tokens.sha256 into
    /// (created if needed; existing files are replaced).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Tokens to make (device-1 … device-N).
    #[arg(long, default_value_t = 3)]
    pub(crate) devices: usize,
}

pub(crate) fn privacy(a: PrivacyArgs) -> anyhow::Result<()> {
    use fedrec_coordinator::privacy::{RdpAccountant, noise_multiplier_for};
    if !(0.0..=1.0).contains(&a.sampling_rate) {
        bail!("--sampling-rate must be in [0, 1], got {}", a.sampling_rate);
    }
    if !(a.delta > 0.0 && a.delta < 1.0) {
        bail!("--delta must be in (0, 1), got {}", a.delta);
    }
    match (a.noise_multiplier, a.epsilon) {
        (Some(z), _) => {
            if !(z >= 0.0 && z.is_finite()) {
                bail!("--noise-multiplier must be >= 0, got {z}");
            }
            let eps = RdpAccountant::epsilon_for(a.sampling_rate, z, a.rounds, a.delta);
            println!(
                "epsilon = {eps:.4} after {} rounds at sampling rate {}, noise multiplier {z}, delta {}",
                a.rounds, a.sampling_rate, a.delta
            );
        }
        (None, Some(eps)) => {
            if !(eps > 0.0 && eps.is_finite()) {
                bail!("--epsilon must be > 0, got {eps}");
            }
            match noise_multiplier_for(eps, a.delta, a.sampling_rate, a.rounds) {
                Some(z) => println!(
                    "noise multiplier = {z:.4} keeps {} rounds at sampling rate {} within epsilon {eps}, delta {}",
                    a.rounds, a.sampling_rate, a.delta
                ),
                None => bail!(
                    "no noise multiplier up to 10,000 keeps {} rounds at sampling rate {} within epsilon {eps}, delta {}",
                    a.rounds,
                    a.sampling_rate,
                    a.delta
                ),
            }
        }
        (None, None) => bail!("give --noise-multiplier or --epsilon"),
    }
    Ok(())
}

pub(crate) fn tokens(args: TokensArgs) -> anyhow::Result<()> {
    let written = fedrec::certs::write_tokens(&args.out, args.devices)?;
    println!(
        "wrote {} enrollment tokens to {}:",
        written.tokens.len(),
        args.out.display()
    );
    println!(
        "  {}: their SHA-256 digests, for the coordinator (fedrec serve --enrollment-tokens FILE)",
        written.digests.display()
    );
    if let (Some(first), Some(last)) = (written.tokens.first(), written.tokens.last()) {
        println!(
            "  {} … {}: one secret token per device (fedrec client --token-file FILE); \
             keep each on its device only",
            first.display(),
            last.display()
        );
    }
    Ok(())
}

pub(crate) fn certs(args: CertsArgs) -> anyhow::Result<()> {
    if args.san.is_empty() {
        bail!("--san needs at least one name");
    }
    let pki = fedrec::certs::write_dev_pki(&args.out, &args.san, args.devices, args.days)?;
    let dir = args.out.display();
    println!(
        "wrote development certificates to {dir} (valid {} days; for trying TLS, not for production):",
        args.days
    );
    println!(
        "  {}: the CA; devices trust it (--ca), the coordinator checks devices against it (--client-ca)",
        pki.ca.display()
    );
    println!(
        "  {}, {}: the coordinator's certificate (names: {}) and key",
        pki.server_cert.display(),
        pki.server_key.display(),
        args.san.join(", ")
    );
    for (cert, key) in &pki.devices {
        println!(
            "  {}, {}: a device's certificate and key",
            cert.display(),
            key.display()
        );
    }
    let host = &args.san[0];
    let host = if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]")
    } else {
        host.clone()
    };
    println!(
        "\nMutual TLS (the coordinator accepts only devices with a certificate from this CA):"
    );
    println!(
        "  fedrec serve --config coordinator.toml --items 100 --tls-cert {} --tls-key {} --client-ca {}",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca.display()
    );
    if let Some((cert, key)) = pki.devices.first() {
        println!(
            "  fedrec client --data /tmp/purchases.tsv --user 1 --coordinator https://{host}:50051 --ca {} --cert {} --key {}",
            pki.ca.display(),
            cert.display(),
            key.display()
        );
    }
    println!("TLS only (devices not authenticated): leave out --client-ca, --cert and --key.");
    Ok(())
}
