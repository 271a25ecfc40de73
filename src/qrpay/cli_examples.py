"""An example for every `qrpay` command, shown at the end of its --help
(tests/test_cli_common.py checks that every command has one)."""

from __future__ import annotations

EXAMPLES: dict[str, str] = {
    "keys new": "qrpay keys new issuer --out issuer.key > issuer.pub",
    "keys public": "qrpay keys public issuer.key",
    "issue": "qrpay issue --issuer-key issuer.key --device-public phone.pub --account 42 "
             "--limit 5000 --scenes bus,metro --days 30 --out phone.cred",
    "token": "qrpay token --credential phone.cred --device-key phone.key --scene bus "
             "--counter-file phone.counter --terminal",
    "scan": "qrpay scan --gateway-dir gw --gateway-key gw.key --issuer-public issuer.pub "
            "--text \"$(cat token.txt)\" --amount 200 --scene bus\n"
            "  qrpay scan --config gateway.toml --file tokens.txt --amount 200 --scene bus",
    "export": "qrpay export --config gateway.toml --out batch-1.qrb",
    "ack": "qrpay ack --config gateway.toml --seq 1",
    "gateway recover": "qrpay gateway recover --gateway-dir gw --gateway-key gw.key "
                       "--issuer-public issuer.pub",
    "gateway sync": "qrpay gateway sync --config gateway.toml --server https://settle.city.example",
    "gateway status": "qrpay gateway status --gateway-dir gw --json\n"
                      "  qrpay gateway status --gateway-dir gw "
                      "--metrics /var/lib/node_exporter/textfile/qrpay.prom -q",
    "serve": "qrpay serve --store postgresql://qrpay@db/qrpay --archive /mnt/archive "
             "--operator-token-file token.txt --port 8080",
    "trust-bundle sign": "qrpay trust-bundle sign --root-key root.key --keys keys.json "
                         "--version 3 --out trust-3.qpt",
    "trust-bundle show": "qrpay trust-bundle show --root-public root.pub --file trust-3.qpt",
    "scale verify": "qrpay scale verify --archive /mnt/archive --issuer-public issuer.pub "
                    "--workers 2",
    "scale settle": "qrpay scale settle --archive /mnt/archive --now 2027-02-01 "
                    "--scheduler tcp://scheduler:8786 --history-out history.csv",
    "scale score": "qrpay scale score --archive /mnt/archive --card card.json "
                   "--policy policy.json --out scores/ --now 2027-02-01",
    "score sample": "qrpay score sample --accounts 20000 --seed 1 --out last_year.csv",
    "score fit": "qrpay score fit --data last_year.csv --label defaulted --id-column account "
                 "--out card.json",
    "score apply": "qrpay score apply --card card.json --data citizens.csv "
                   "--id-column account --out scores.csv",
    "score report": "qrpay score report --card card.json --data last_year.csv "
                    "--label defaulted --policy policy.json --out report.html --png charts",
    "deny-list apply": "qrpay deny-list apply --config gateway.toml --file deny-7.qpd",
    "deny-list publish": "qrpay deny-list publish --settlement-dir settle "
                         "--issuer-key issuer.key --out deny-8.qpd",
    "settlement trust": "qrpay settlement trust --settlement-dir settle "
                        "--issuer-public issuer.pub",
    "settlement keys": "qrpay settlement keys --settlement-dir settle",
    "settlement operator": "qrpay settlement operator --settlement-dir settle "
                           "--gateway-public gw.pub --operator city-bus",
    "settlement fees": "qrpay settlement fees --settlement-dir settle --schedule fees.json",
    "close": "qrpay close --settlement-dir settle --until 2027-01-16T00:00:00+08:00 "
             "--settlement-key settlement.key",
    "statement write": "qrpay statement write --settlement-dir settle --period 3 "
                       "--operator city-bus --out bus-3.qps",
    "statement verify": "qrpay statement verify bus-3.qps --settlement-public settlement.pub",
    "archive ls": "qrpay archive ls --settlement-dir settle",
    "ingest": "qrpay ingest --settlement-dir settle uploads/*.qrb",
    "report": "qrpay report --settlement-dir settle > report.json",
    "repay": "qrpay repay --settlement-dir settle --account 42 --amount 200 "
             "--reference BANK-0001\n"
             "  qrpay repay --settlement-dir settle --file bank.csv",
    "history": "qrpay history --settlement-dir settle --out history.csv",
    "simulate": "qrpay simulate --days 3 --json report.json",
}


def epilog(command: str) -> str | None:
    example = EXAMPLES.get(command)
    return None if example is None else f"example:\n  {example}"
