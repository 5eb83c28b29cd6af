#!/usr/bin/env bash
# Generates the synthetic sample export trees that conf/gateway.toml serves:
#   data/concelier/<export-id>/mirror/...   advisory bundles, manifests, index, signatures
#   data/excititor/<export-id>/mirror/...   VEX domain list, per-domain indexes, exports
#   data/<product>/latest -> <newest export id>
# Two exports per product, so tests can tell an old export from a new one. Content is
# deterministic; only the signatures (ECDSA, random nonce) differ from one run to the next.
# Needs bash, coreutils, awk and openssl. Re-running replaces data/ whole.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out="${SAMPLE_MIRROR_DATA:-$here/data}"
key="${SAMPLE_MIRROR_KEY:-$here/signing-key.pem}"

readonly OLD_EXPORT=20261201T000000Z
readonly NEW_EXPORT=20261202T000000Z
readonly DOMAINS=(primary community)

# Advisories per bundle: the newest primary bundle is the large one (over 5 MB).
declare -A ADVISORY_COUNT=(
    [$OLD_EXPORT/primary]=400
    [$OLD_EXPORT/community]=120
    [$NEW_EXPORT/primary]=9000
    [$NEW_EXPORT/community]=150
)
declare -A DISPLAY_NAME=([primary]="Primary mirror (authenticated)" [community]="Community mirror (public)")
# Excititor export keys per export id: the newer export adds one.
declare -A VEX_EXPORT_KEYS=([$OLD_EXPORT]="consensus" [$NEW_EXPORT]="consensus statements")
declare -A VEX_STATEMENTS=([$OLD_EXPORT]=3 [$NEW_EXPORT]=5)

main() {
    for tool in awk openssl sha256sum base64; do
        command -v "$tool" >/dev/null || die "'$tool' not found on PATH; install it with scripts/setup-debian.sh"
    done
    [[ -r "$key" ]] || die "signing key '$key' is missing or unreadable; set SAMPLE_MIRROR_KEY to a PEM private key"
    mkdir -p "$out"
    # Leftovers of interrupted runs; a run still in progress is younger than 10 minutes.
    find "$out" -maxdepth 1 -name '.staging.*' -mmin +10 -exec rm -rf {} +
    staging=$(mktemp -d "$out/.staging.XXXXXX")
    trap 'rm -rf "$staging"' EXIT

    for export_id in "$OLD_EXPORT" "$NEW_EXPORT"; do
        concelier_export "$staging/concelier/$export_id" "$export_id"
        excititor_export "$staging/excititor/$export_id" "$export_id"
    done
    for product in concelier excititor; do
        ln -s "$NEW_EXPORT" "$staging/$product/latest"
        rm -rf "${out:?}/$product"
        mv "$staging/$product" "$out/$product"
    done
    echo "sample mirror data written to $out (latest = $NEW_EXPORT)"
}

die() {
    echo "generate.sh: $*" >&2
    exit 1
}

# Prints the ISO 8601 form of an export id: 20261202T000000Z -> 2026-12-02T00:00:00Z.
iso_time() {
    local id=$1
    echo "${id:0:4}-${id:4:2}-${id:6:2}T${id:9:2}:${id:11:2}:${id:13:2}Z"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
size_of() { wc -c <"$1" | tr -d ' '; }

# Writes a cosign-style detached signature: base64 of the DER ECDSA signature over SHA-256.
sign_file() {
    openssl dgst -sha256 -sign "$key" "$1" | base64 -w0 >"$1.jws"
}

concelier_export() {
    local dir=$1 export_id=$2 generated domain
    generated=$(iso_time "$export_id")
    for domain in "${DOMAINS[@]}"; do
        mkdir -p "$dir/mirror/$domain"
        write_bundle "$dir/mirror/$domain/bundle.json" "$export_id" "$generated" "$domain"
        sign_file "$dir/mirror/$domain/bundle.json"
        write_manifest "$dir/mirror/$domain" "$export_id" "$generated" "$domain"
    done
    write_concelier_index "$dir/mirror" "$export_id" "$generated"
}

write_bundle() {
    local file=$1 export_id=$2 generated=$3 domain=$4
    awk -v export_id="$export_id" -v generated="$generated" -v domain="$domain" \
        -v count="${ADVISORY_COUNT[$export_id/$domain]}" "$BUNDLE_AWK" >"$file"
}

# Prints a bundle with one synthetic advisory a line. Every field derives from the advisory's
# number, the domain and the export id, so the output is deterministic.
BUNDLE_AWK='
BEGIN {
    split("low medium high critical", severity, " ")
    split("4.3 6.5 8.1 9.8", score, " ")
    split("npm pypi cargo gem nuget", ecosystem, " ")
    printf "{\n  \"schemaVersion\": 1,\n  \"kind\": \"concelier.advisory-bundle\",\n"
    printf "  \"exportId\": \"%s\",\n  \"domainId\": \"%s\",\n", export_id, domain
    printf "  \"generatedAt\": \"%s\",\n  \"advisoryCount\": %d,\n", generated, count
    printf "  \"advisories\": [\n"
    for (i = 1; i <= count; i++) {
        key = sprintf("SAMPLE-%s-%06d", toupper(domain), i)
        s = 1 + i % 4; e = 1 + i % 5; minor = i % 10
        date = sprintf("2026-%02d-%02dT%02d:00:00Z", 1 + i % 12, 1 + i % 28, i % 24)
        printf "    {\"advisoryKey\": \"%s\", \"title\": \"Synthetic %s-severity issue in sample-lib-%d\", ", key, severity[s], i
        printf "\"summary\": \"Synthetic advisory generated for mirror-gateway tests; it describes no real vulnerability.\", "
        printf "\"severity\": \"%s\", \"cvss\": {\"version\": \"3.1\", \"baseScore\": %s}, ", severity[s], score[s]
        printf "\"published\": \"%s\", \"modified\": \"%s\", ", date, generated
        printf "\"aliases\": [\"%s\", \"SAMPLE-ALIAS-%06d\"], ", key, i
        printf "\"affectedPackages\": [{\"type\": \"%s\", \"identifier\": \"pkg:%s/sample-lib-%d\", ", ecosystem[e], ecosystem[e], i
        printf "\"versionRanges\": [{\"introduced\": \"1.%d.0\", \"fixed\": \"1.%d.%d\"}]}], ", minor, minor, 1 + i % 7
        printf "\"references\": [{\"kind\": \"advisory\", \"url\": \"https://example.invalid/advisories/%s\"}], ", key
        printf "\"provenance\": {\"source\": \"sample-generator\", \"exportId\": \"%s\"}}%s\n", export_id, (i < count ? "," : "")
    }
    printf "  ]\n}\n"
}'

write_manifest() {
    local dir=$1 export_id=$2 generated=$3 domain=$4
    cat >"$dir/manifest.json" <<EOF
{
  "schemaVersion": 1,
  "kind": "concelier.mirror-manifest",
  "exportId": "$export_id",
  "generatedAt": "$generated",
  "domainId": "$domain",
  "displayName": "${DISPLAY_NAME[$domain]}",
  "counts": {"advisories": ${ADVISORY_COUNT[$export_id/$domain]}},
  "bundle": {"path": "bundle.json", "sha256": "$(sha256_of "$dir/bundle.json")", "size": $(size_of "$dir/bundle.json")},
  "signature": {"path": "bundle.json.jws", "format": "cosign-blob", "algorithm": "ecdsa-p256-sha256"}
}
EOF
}

# Paths in the index are relative to its URL, /concelier/exports/index.json.
write_concelier_index() {
    local dir=$1 export_id=$2 generated=$3 domain sep=""
    {
        printf '{\n  "schemaVersion": 1,\n  "kind": "concelier.mirror-index",\n'
        printf '  "exportId": "%s",\n  "generatedAt": "%s",\n  "domains": [\n' "$export_id" "$generated"
        for domain in "${DOMAINS[@]}"; do
            local d="$dir/$domain"
            printf '%s    {"id": "%s", "displayName": "%s", "advisoryCount": %d,\n' \
                "$sep" "$domain" "${DISPLAY_NAME[$domain]}" "${ADVISORY_COUNT[$export_id/$domain]}"
            printf '     "manifest": {"path": "mirror/%s/manifest.json", "sha256": "%s", "size": %d},\n' \
                "$domain" "$(sha256_of "$d/manifest.json")" "$(size_of "$d/manifest.json")"
            printf '     "bundle": {"path": "mirror/%s/bundle.json", "sha256": "%s", "size": %d},\n' \
                "$domain" "$(sha256_of "$d/bundle.json")" "$(size_of "$d/bundle.json")"
            printf '     "signature": {"path": "mirror/%s/bundle.json.jws"}}' "$domain"
            sep=$',\n'
        done
        printf '\n  ]\n}\n'
    } >"$dir/index.json"
}

excititor_export() {
    local dir=$1 export_id=$2 generated domain sep=""
    generated=$(iso_time "$export_id")
    for domain in "${DOMAINS[@]}"; do
        excititor_domain "$dir/mirror/$domain" "$export_id" "$generated" "$domain"
    done
    {
        printf '{\n  "schemaVersion": 1,\n  "kind": "excititor.mirror-domains",\n'
        printf '  "exportId": "%s",\n  "generatedAt": "%s",\n  "domains": [\n' "$export_id" "$generated"
        for domain in "${DOMAINS[@]}"; do
            printf '%s    {"id": "%s", "displayName": "%s", "index": "%s/index.json"}' \
                "$sep" "$domain" "${DISPLAY_NAME[$domain]}" "$domain"
            sep=$',\n'
        done
        printf '\n  ]\n}\n'
    } >"$dir/mirror/domains.json"
}

# Writes every export key in four formats, then the domain index that lists them.
# Paths in the index are relative to its URL, /excititor/mirror/<domain>/index.json.
excititor_domain() {
    local dir=$1 export_id=$2 generated=$3 domain=$4 export_key format suffix file sep=""
    mkdir -p "$dir/exports"
    {
        printf '{\n  "schemaVersion": 1,\n  "kind": "excititor.mirror-domain-index",\n'
        printf '  "domainId": "%s",\n  "exportId": "%s",\n  "generatedAt": "%s",\n  "exports": [\n' \
            "$domain" "$export_id" "$generated"
        for export_key in ${VEX_EXPORT_KEYS[$export_id]}; do
            for format in json jsonl openvex csaf; do
                case $format in
                    json) suffix=json ;;
                    jsonl) suffix=jsonl ;;
                    *) suffix=$format.json ;;
                esac
                file="$dir/exports/$export_key.$suffix"
                awk -v fmt="$format" -v export_key="$export_key" -v export_id="$export_id" \
                    -v domain="$domain" -v generated="$generated" \
                    -v count="${VEX_STATEMENTS[$export_id]}" "$VEX_AWK" >"$file"
                printf '%s    {"exportKey": "%s", "format": "%s", "path": "exports/%s", "sha256": "%s", "size": %d}' \
                    "$sep" "$export_key" "$format" "$export_key.$suffix" "$(sha256_of "$file")" "$(size_of "$file")"
                sep=$',\n'
            done
        done
        printf '\n  ]\n}\n'
    } >"$dir/index.json"
}

# Prints synthetic VEX statements about the sample advisories in format `fmt`.
VEX_AWK='
BEGIN {
    split("not_affected affected fixed under_investigation", status, " ")
    split("known_not_affected known_affected fixed under_investigation", csaf_status, " ")
    offset = (export_key == "statements") ? 100 : 0
    for (i = 1; i <= count; i++) {
        n = i + offset
        vuln[i] = sprintf("SAMPLE-%s-%06d", toupper(domain), n)
        purl[i] = sprintf("pkg:npm/sample-lib-%d@1.%d.0", n, n % 10)
        st[i] = 1 + (i - 1) % 4
    }
    doc_id = sprintf("stella-sample-%s-%s-%s", domain, export_key, export_id)
    if (fmt == "json") json()
    else if (fmt == "jsonl") jsonl()
    else if (fmt == "openvex") openvex()
    else csaf()
}
function justification(i) {
    return st[i] == 1 ? ", \"justification\": \"vulnerable_code_not_in_execute_path\"" : ""
}
function json(   i) {
    printf "{\n  \"schemaVersion\": 1,\n  \"exportKey\": \"%s\",\n  \"exportId\": \"%s\",\n", export_key, export_id
    printf "  \"domainId\": \"%s\",\n  \"format\": \"json\",\n  \"generatedAt\": \"%s\",\n  \"claims\": [\n", domain, generated
    for (i = 1; i <= count; i++)
        printf "    {\"vulnerabilityId\": \"%s\", \"productKey\": \"%s\", \"status\": \"%s\"%s}%s\n", \
            vuln[i], purl[i], status[st[i]], justification(i), (i < count ? "," : "")
    printf "  ]\n}\n"
}
function jsonl(   i) {
    for (i = 1; i <= count; i++)
        printf "{\"exportKey\": \"%s\", \"exportId\": \"%s\", \"vulnerabilityId\": \"%s\", \"productKey\": \"%s\", \"status\": \"%s\"%s}\n", \
            export_key, export_id, vuln[i], purl[i], status[st[i]], justification(i)
}
function openvex(   i) {
    printf "{\n  \"@context\": \"https://openvex.dev/ns/v0.2.0\",\n"
    printf "  \"@id\": \"https://example.invalid/vex/%s\",\n", doc_id
    printf "  \"author\": \"Stella Ops sample generator\",\n  \"timestamp\": \"%s\",\n  \"version\": 1,\n", generated
    printf "  \"statements\": [\n"
    for (i = 1; i <= count; i++)
        printf "    {\"vulnerability\": {\"name\": \"%s\"}, \"products\": [{\"@id\": \"%s\"}], \"status\": \"%s\"%s}%s\n", \
            vuln[i], purl[i], status[st[i]], justification(i), (i < count ? "," : "")
    printf "  ]\n}\n"
}
function csaf(   i) {
    printf "{\n  \"document\": {\n    \"category\": \"csaf_vex\",\n    \"csaf_version\": \"2.0\",\n"
    printf "    \"publisher\": {\"category\": \"vendor\", \"name\": \"Stella Ops sample generator\", \"namespace\": \"https://example.invalid\"},\n"
    printf "    \"title\": \"Synthetic VEX export %s\",\n", doc_id
    printf "    \"tracking\": {\"id\": \"%s\", \"status\": \"final\", \"version\": \"1\", ", doc_id
    printf "\"initial_release_date\": \"%s\", \"current_release_date\": \"%s\", ", generated, generated
    printf "\"revision_history\": [{\"date\": \"%s\", \"number\": \"1\", \"summary\": \"Synthetic sample export\"}]}\n  },\n", generated
    printf "  \"product_tree\": {\"full_product_names\": [\n"
    for (i = 1; i <= count; i++)
        printf "    {\"product_id\": \"CSAFPID-%04d\", \"name\": \"%s\", \"product_identification_helper\": {\"purl\": \"%s\"}}%s\n", \
            i, purl[i], purl[i], (i < count ? "," : "")
    printf "  ]},\n  \"vulnerabilities\": [\n"
    for (i = 1; i <= count; i++)
        printf "    {\"ids\": [{\"system_name\": \"Stella Ops sample\", \"text\": \"%s\"}], \"product_status\": {\"%s\": [\"CSAFPID-%04d\"]}}%s\n", \
            vuln[i], csaf_status[st[i]], i, (i < count ? "," : "")
    printf "  ]\n}\n"
}'

main "$@"
