//! Tests of the configuration: defaults, parsing, and every range check.

use super::*;

#[test]
fn privacy_needs_a_sampling_rate_uniform_weighting_and_secagg_when_distributed() {
    let err = |text: &str| {
        CoordinatorConfig::from_toml_str(text)
            .unwrap_err()
            .to_string()
    };
    let e = err("[privacy]\nmode = \"central\"\n");
    assert!(e.contains("privacy.sampling_rate"), "{e}");
    let e = err("[privacy]\nmode = \"central\"\nsampling_rate = 0.1\n");
    assert!(e.contains("strategy.weighting"), "{e}");
    let uniform = "[strategy]\nweighting = \"uniform\"\n";
    let e = err(&format!(
        "{uniform}[privacy]\nmode = \"distributed\"\nsampling_rate = 0.1\n"
    ));
    assert!(e.contains("secure_aggregation.enabled"), "{e}");
    let e = err(&format!(
        "{uniform}[privacy]\nmode = \"central\"\nsampling_rate = 1.5\n"
    ));
    assert!(e.contains("privacy.sampling_rate"), "{e}");
    let ok = CoordinatorConfig::from_toml_str(&format!(
        "{uniform}[secure_aggregation]\nenabled = true\n[privacy]\nmode = \"distributed\"\n\
         sampling_rate = 0.1\nepsilon_budget = 8.0\nadaptive_clip = true\n"
    ))
    .unwrap();
    assert_eq!(ok.privacy.mode, DpMode::Distributed);
    assert_eq!(ok.privacy.epsilon_budget, Some(8.0));
}

#[test]
fn empty_file_gives_defaults() {
    let config = CoordinatorConfig::from_toml_str("").unwrap();
    assert_eq!(config, CoordinatorConfig::default());
    assert_eq!(config.server.listen, DEFAULT_LISTEN);
    assert_eq!(config.rounds.deadline(), Duration::from_secs(60));
    assert_eq!(config.strategy.name, StrategyName::FedAvg);
}

#[test]
fn round_trips_through_toml() {
    let mut config = CoordinatorConfig::default();
    config.rounds.seed = Some(3);
    config.rounds.fraction = Some(0.5);
    config.strategy.name = StrategyName::FedYogi;
    config.model.items = Some(100);
    config.download.encoding = Encoding::Q8;
    config.upload.encoding = Encoding::F16;
    let text = config.to_toml_string().unwrap();
    assert!(text.contains("name = \"fedyogi\""), "{text}");
    assert!(text.contains("[download]\nencoding = \"q8\""), "{text}");
    assert!(text.contains("[upload]\nencoding = \"f16\""), "{text}");
    assert_eq!(CoordinatorConfig::from_toml_str(&text).unwrap(), config);
}

#[test]
fn integers_are_accepted_for_seconds() {
    let config = CoordinatorConfig::from_toml_str(
        "[rounds]\ndeadline_secs = 5\ncheckin_window_secs = 0.25\n",
    )
    .unwrap();
    assert_eq!(config.rounds.deadline(), Duration::from_secs(5));
    assert_eq!(config.rounds.checkin_window(), Duration::from_millis(250));
}

#[test]
fn errors_name_the_problem() {
    let err = CoordinatorConfig::from_toml_str("[rounds]\nclients_per_round = 0\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: rounds.clients_per_round must be >= 1, got 0"
    );
    let err = CoordinatorConfig::from_toml_str("[rounds]\nclient_per_round = 3\n").unwrap_err();
    assert!(err.to_string().contains("client_per_round"), "{err}");
    let err = CoordinatorConfig::from_toml_str("[strategy]\nname = \"sgd\"\n").unwrap_err();
    assert!(err.to_string().contains("sgd"), "{err}");
    let err = CoordinatorConfig::from_toml_str("[rounds]\nover_selection = 0.5\n").unwrap_err();
    assert!(
        err.to_string()
            .contains("rounds.over_selection must be >= 1"),
        "{err}"
    );
    let err = CoordinatorConfig::from_toml_str("[download]\nencoding = \"q4\"\n").unwrap_err();
    assert!(
        err.to_string().contains("q4") && err.to_string().contains("f16"),
        "{err}"
    );
    let err = CoordinatorConfig::from_toml_str(
        "[upload]\nencoding = \"q8\"\n[secure_aggregation]\nenabled = true\n",
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("upload.encoding = \"q8\"")
            && err.to_string().contains("secure_aggregation.bits"),
        "{err}"
    );
    let err = CoordinatorConfig::from_toml_str("[strategy]\nbeta2 = 1.0\n").unwrap_err();
    assert!(err.to_string().contains("strategy.beta2"), "{err}");
    let err = CoordinatorConfig::from_toml_str("[server]\nlisten = \"nowhere\"\n").unwrap_err();
    assert!(err.to_string().contains("server.listen"), "{err}");
    let err =
        CoordinatorConfig::from_toml_str("[rounds]\nclients_per_round = 2\nmin_updates = 3\n")
            .unwrap_err();
    assert!(err.to_string().contains("min_updates (3)"), "{err}");
    let err = CoordinatorConfig::from_toml_str("[strategy]\nname = \"als\"\n").unwrap_err();
    assert!(err.to_string().contains("training.loss = \"als\""), "{err}");
    // Issue 19, item 3: a session must outlast a long poll.
    let err = CoordinatorConfig::from_toml_str("[auth]\nsession_ttl_secs = 2\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: auth.session_ttl_secs must be at least \
         server.long_poll_secs + 30 = 40, got 2: a shorter session can end in the middle \
         of a check-in"
    );
    // Issue 19, item 10: a huge number is written short.
    let err = CoordinatorConfig::from_toml_str("[rounds]\ndeadline_secs = 1e300\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: rounds.deadline_secs must be > 0 and <= 31536000, got 1e300"
    );
    let als = "[training]\nloss = \"als\"\n[strategy]\nname = \"als\"\n";
    assert!(CoordinatorConfig::from_toml_str(als).is_ok());
    let err = CoordinatorConfig::from_toml_str(&format!(
        "{als}[privacy]\nmode = \"central\"\nsampling_rate = 0.1\n"
    ))
    .unwrap_err();
    assert!(err.to_string().contains("differential privacy"), "{err}");
    let err =
        CoordinatorConfig::from_toml_str(&format!("{als}aggregation = \"median\"\n")).unwrap_err();
    assert!(err.to_string().contains("x xᵀ"), "{err}");
}

/// Issue 19, items 6 and 7: the coordinator refuses training settings
/// every device would refuse (one definition, `fedrec_proto::limits`),
/// and a model larger than its memory budget, naming both numbers.
#[test]
fn settings_devices_refuse_and_oversized_models_are_refused() {
    for (line, message) in [
        (
            "learning_rate = 20",
            "training.learning_rate must be in (0, 10], got 20",
        ),
        (
            "local_epochs = 3000",
            "training.local_epochs must be in [1, 1000], got 3000",
        ),
        (
            "regularization = 11",
            "training.regularization must be in [0, 10]",
        ),
        (
            "proximal_mu = 101",
            "training.proximal_mu must be in [0, 100]",
        ),
        (
            "negatives = 1001",
            "training.negatives must be in [1, 1000]",
        ),
    ] {
        let err = CoordinatorConfig::from_toml_str(&format!("[training]\n{line}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(message), "{line}: {err}");
        assert!(err.contains("devices refuse"), "{err}");
    }
    let limits = fedrec_proto::limits::LEARNING_RATE;
    let edge = format!("[training]\nlearning_rate = {}\n", limits.hi);
    assert!(CoordinatorConfig::from_toml_str(&edge).is_ok());

    let err = CoordinatorConfig::from_toml_str("[model]\nitems = 100000000\nfactors = 64\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("100000000 × 64 = 6400000000 values (25600000000 bytes as f32)")
            && err.contains("model.max_bytes = 1073741824"),
        "{err}"
    );
    let fits = "[model]\nitems = 100000000\nfactors = 64\nmax_bytes = 30000000000\n";
    assert!(CoordinatorConfig::from_toml_str(fits).is_ok());
}

#[test]
fn secure_aggregation_section_is_validated() {
    let c = CoordinatorConfig::from_toml_str(
        "[secure_aggregation]\nenabled = true\nthreshold = 0.75\nrange = 0.5\nbits = 16\nneighbours = 8\n",
    )
    .unwrap();
    let sa = &c.secure_aggregation;
    assert!(sa.enabled);
    assert_eq!(sa.protocol().params(100).unwrap().neighbours, 8);
    assert_eq!(sa.protocol().params(100).unwrap().threshold, 6);
    assert_eq!(
        CoordinatorConfig::default().secure_aggregation.range,
        DEFAULT_SECAGG_RANGE
    );
    for (body, needle) in [
        ("threshold = 0.5", "secure_aggregation.threshold must be"),
        (
            "bits = 0",
            "secure_aggregation.bits must be in 2..=31, got 0",
        ),
        (
            "range = -1",
            "secure_aggregation.range must be finite and > 0, got -1",
        ),
        (
            "neighbours = 0",
            "secure_aggregation.neighbours must be in 1..=255",
        ),
        (
            "max_examples = 0",
            "secure_aggregation.max_examples must be >= 1",
        ),
        ("step_secs = 0", "secure_aggregation.step_secs must be"),
        ("thresold = 0.7", "thresold"),
        // 30-bit values: a sum of at most 4 cannot hold a cohort of 10.
        ("enabled = true\nbits = 30", "could overflow"),
    ] {
        let err = CoordinatorConfig::from_toml_str(&format!("[secure_aggregation]\n{body}\n"))
            .unwrap_err();
        assert!(err.to_string().contains(needle), "{body}: {err}");
    }
    // The same bits are fine while the section is disabled.
    CoordinatorConfig::from_toml_str("[secure_aggregation]\nbits = 30\n").unwrap();
}

#[test]
fn file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    let err = CoordinatorConfig::from_file(&path).unwrap_err();
    assert!(err.to_string().contains("coordinator.toml"), "{err}");

    std::fs::write(&path, "[rounds]\nmin_updates = 0\n").unwrap();
    let err = CoordinatorConfig::from_file(&path).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("coordinator.toml")
            && text.contains("rounds.min_updates must be >= 1, got 0"),
        "{text}"
    );

    std::fs::write(&path, "[rounds\n").unwrap();
    let err = CoordinatorConfig::from_file(&path).unwrap_err();
    assert!(err.to_string().contains("coordinator.toml"), "{err}");

    std::fs::write(&path, "[rounds]\nrounds = 3\n").unwrap();
    assert_eq!(
        CoordinatorConfig::from_file(&path).unwrap().rounds.rounds,
        3
    );
}

#[test]
fn the_settings_search_is_refused_where_it_cannot_run_and_checked() {
    let err = |text: &str| {
        CoordinatorConfig::from_toml_str(text)
            .unwrap_err()
            .to_string()
    };
    let auto = "[model]\npreset = \"auto\"\n";
    let ok = CoordinatorConfig::from_toml_str(auto).unwrap();
    assert_eq!(ok.model.preset, Some(ModelPreset::Auto));
    assert_eq!(ok.search, SearchConfig::default());
    let e = err(&format!(
        "{auto}[strategy]\nweighting = \"uniform\"\n[privacy]\nmode = \"central\"\nsampling_rate = 0.1\n"
    ));
    assert!(e.contains("refused under differential privacy"), "{e}");
    let e = err(&format!("{auto}[rounds]\nmode = \"async\"\n"));
    assert!(e.contains("rounds.mode = \"sync\""), "{e}");
    let e = err("[search]\nfactors = []\n");
    assert!(e.contains("search.factors lists nothing"), "{e}");
    let e = err("[search]\nconfidence = [0.0]\n");
    assert!(e.contains("search: training.confidence"), "{e}");
    let e = err("[search]\nrounds = 0\n");
    assert!(e.contains("search.rounds"), "{e}");
    let e = err("[model]\npreset = \"movielens\"\n");
    assert!(e.contains("auto"), "{e}");
}

#[test]
fn replicas_refuse_async_mode_with_a_message() {
    let text =
        "[rounds]\nmode = \"async\"\n[cluster]\nstore = \"postgres://fedrec@127.0.0.1/fedrec\"\n";
    let e = CoordinatorConfig::from_toml_str(text)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("replicated coordinator") && e.contains("mode = \"sync\""),
        "{e}"
    );
    assert!(CoordinatorConfig::from_toml_str("[rounds]\nmode = \"async\"\n").is_ok());
}

#[test]
fn rest_is_refused_with_differential_privacy() {
    let e = CoordinatorConfig::from_toml_str(
        "[rounds]\nrest_secs = 60.0\n[strategy]\nweighting = \"uniform\"\n\
         [privacy]\nmode = \"central\"\nsampling_rate = 0.1\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("rounds.rest_secs") && e.contains("Poisson"),
        "{e}"
    );
}
