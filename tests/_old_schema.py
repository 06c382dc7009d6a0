"""The results database's ``evaluations`` table as Bastion created it before the derived
interval columns (written out by hand, on purpose), for the tests of migration and comparison."""

OLD_EVALUATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY, config_hash TEXT NOT NULL, experiment TEXT NOT NULL, dataset TEXT NOT NULL,
    model_key TEXT NOT NULL, defense TEXT NOT NULL, protocol TEXT NOT NULL, attack TEXT NOT NULL,
    attack_label TEXT NOT NULL, attack_params TEXT NOT NULL, norm TEXT NOT NULL, eps REAL NOT NULL,
    n INTEGER NOT NULL, clean_accuracy REAL NOT NULL, robust_accuracy REAL NOT NULL, per_sample BLOB,
    gradients INTEGER NOT NULL DEFAULT 0, forwards INTEGER NOT NULL DEFAULT 0, seconds REAL NOT NULL DEFAULT 0,
    extra TEXT NOT NULL DEFAULT '{}', versions TEXT NOT NULL, created REAL NOT NULL,
    UNIQUE (config_hash, model_key, protocol, attack_label, norm, eps)
);
"""
