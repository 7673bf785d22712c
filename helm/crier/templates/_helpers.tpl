{{/* Chart name. */}}
{{- define "crier.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, prefixed unless it already contains the chart name. */}}
{{- define "crier.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Selector labels. */}}
{{- define "crier.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crier.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels. */}}
{{- define "crier.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "crier.selectorLabels" . }}
app.kubernetes.io/version: {{ (.Values.image.tag | default .Chart.AppVersion) | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The ServiceAccount the pods run as. */}}
{{- define "crier.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "crier.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The crier configuration as a dict: .Values.config, plus the convenience
values where config does not set the same thing (config wins):
- redis.url, unless config.redis.url, config.redis.sentinel or config.redis.cluster is set (crier
  takes one or the other, never both);
- with redis.tls.secretName, [redis.tls] ca_file (and cert_file / key_file
  with redis.tls.clientCertificate) in the Secret's mount, each unless
  config.redis.tls sets it.
*/}}
{{- define "crier.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $values := .Values.redis | default dict }}
{{- $redis := deepCopy (get $config "redis" | default dict) }}
{{- if and $values.url (not (get $redis "url")) (not (get $redis "sentinel")) (not (get $redis "cluster")) }}
{{- $_ := set $redis "url" $values.url }}
{{- end }}
{{- $tls := $values.tls | default dict }}
{{- if $tls.secretName }}
{{- $dir := include "crier.redisTlsDir" . }}
{{- $files := deepCopy (get $redis "tls" | default dict) }}
{{- if not (get $files "ca_file") }}
{{- $_ := set $files "ca_file" (printf "%s/ca.crt" $dir) }}
{{- end }}
{{- if $tls.clientCertificate }}
{{- if not (get $files "cert_file") }}
{{- $_ := set $files "cert_file" (printf "%s/tls.crt" $dir) }}
{{- end }}
{{- if not (get $files "key_file") }}
{{- $_ := set $files "key_file" (printf "%s/tls.key" $dir) }}
{{- end }}
{{- end }}
{{- $_ := set $redis "tls" $files }}
{{- end }}
{{- if gt (len $redis) 0 }}
{{- $_ := set $config "redis" $redis }}
{{- end }}
{{- toJson $config }}
{{- end }}

{{/* Where the redis.tls.secretName Secret is mounted (read-only). */}}
{{- define "crier.redisTlsDir" -}}
/etc/crier/redis-tls
{{- end }}

{{/* The redis.tls convenience values, as a dict (empty when unset). */}}
{{- define "crier.redisTls" -}}
{{- toJson ((.Values.redis | default dict).tls | default dict) }}
{{- end }}

{{/*
The configuration as TOML (crier.toml).

- scalars: strings, booleans and numbers are written with toJson, whose
  output is valid TOML; numbers without a fractional part come out as
  integers (1000, not 1000.0 or 1e+03), whatever YAML or JSON gave Helm;
- lists of scalars: [a, b];
- maps: [table] / [table.sub] sections, nested as deep as needed;
- lists of maps: [[array.of.tables]], and a map inside one of their
  elements (channels[].history) as an inline table { size = 1000, ttl = "1h" };
- null values are left out (crier's default applies).
*/}}
{{- define "crier.toml" -}}
# crier.toml, rendered by the Helm chart from .Values.config (and redis.url, redis.tls).
# Every key: docs/configuration.md. CRIER_* environment variables win over it.
{{- include "crier.tomlTable" (dict "path" (list) "table" (include "crier.config" . | fromJson)) }}
{{- end }}

{{/* One table: its key = value lines, then its sub-tables; takes (dict "path" list "table" map). */}}
{{- define "crier.tomlTable" -}}
{{- $path := .path }}
{{- $table := .table }}
{{- range $key := keys $table | sortAlpha }}
{{- $value := get $table $key }}
{{- if not (or (kindIs "invalid" $value) (kindIs "map" $value) (include "crier.isTableArray" $value)) }}
{{ include "crier.tomlKey" $key }} = {{ include "crier.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $key := keys $table | sortAlpha }}
{{- $value := get $table $key }}
{{- $sub := append $path (include "crier.tomlKey" $key) }}
{{- if kindIs "map" $value }}
{{- if or (eq (len $value) 0) (include "crier.hasPairs" $value) }}

[{{ join "." $sub }}]
{{- end }}
{{- include "crier.tomlTable" (dict "path" $sub "table" $value) }}
{{- else if include "crier.isTableArray" $value }}
{{- range $element := $value }}

[[{{ join "." $sub }}]]
{{- range $k := keys $element | sortAlpha }}
{{- $v := get $element $k }}
{{- if not (or (kindIs "invalid" $v) (kindIs "map" $v)) }}
{{ include "crier.tomlKey" $k }} = {{ include "crier.tomlValue" $v }}
{{- end }}
{{- end }}
{{- range $k := keys $element | sortAlpha }}
{{- $v := get $element $k }}
{{- if kindIs "map" $v }}
{{ include "crier.tomlKey" $k }} = {{ include "crier.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when a map holds at least one key = value line (not only sub-tables). */}}
{{- define "crier.hasPairs" -}}
{{- range $k, $v := . }}
{{- if not (or (kindIs "invalid" $v) (kindIs "map" $v) (include "crier.isTableArray" $v)) }}true{{ end }}
{{- end }}
{{- end }}

{{/* "true" when the value is a non-empty list whose items are all maps. */}}
{{- define "crier.isTableArray" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) }}
{{- $all := true }}
{{- range . }}{{ if not (kindIs "map" .) }}{{ $all = false }}{{ end }}{{ end }}
{{- if $all }}true{{ end }}
{{- end }}
{{- end }}

{{/* A key: bare when it can be, else a quoted string. */}}
{{- define "crier.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ include "crier.tomlString" . }}{{ end }}
{{- end }}

{{/* A TOML basic string (JSON string escapes are TOML's; DEL must be escaped too). */}}
{{- define "crier.tomlString" -}}
{{- toJson . | replace "\u007f" "\\u007F" }}
{{- end }}

{{/* Any value inline: scalar, [list], { inline = "table" }. */}}
{{- define "crier.tomlValue" -}}
{{- if kindIs "map" . -}}
{ {{- range $i, $k := keys . | sortAlpha }}{{ if $i }},{{ end }} {{ include "crier.tomlKey" $k }} = {{ include "crier.tomlValue" (get $ $k) }}{{ end }} }
{{- else if kindIs "slice" . -}}
[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "crier.tomlValue" $v }}{{ end }}]
{{- else if kindIs "string" . -}}
{{ include "crier.tomlString" . }}
{{- else if kindIs "invalid" . -}}
{{ fail "config: null inside a list or inline table cannot be written as TOML" }}
{{- else if kindIs "float64" . -}}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ toJson . }}{{ end }}
{{- else -}}
{{ toJson . }}
{{- end }}
{{- end }}

{{/*
A crier duration ("500ms", "5s", "2m", "1h 30m", humantime units) in whole
milliseconds; takes (list "key.name" value).
*/}}
{{- define "crier.durationMs" -}}
{{- $name := index . 0 }}
{{- $text := index . 1 }}
{{- if not (kindIs "string" $text) }}
{{- fail (printf "config.%s: a duration is a string such as \"5s\" (got %v)" $name $text) }}
{{- end }}
{{- $units := dict "ns" 0.000001 "nsec" 0.000001 "us" 0.001 "usec" 0.001 "ms" 1 "msec" 1 "s" 1000 "sec" 1000 "second" 1000 "seconds" 1000 "m" 60000 "min" 60000 "minute" 60000 "minutes" 60000 "h" 3600000 "hr" 3600000 "hour" 3600000 "hours" 3600000 "d" 86400000 "day" 86400000 "days" 86400000 }}
{{- $clean := regexReplaceAll "\\s+" $text "" }}
{{- if not (regexMatch "^([0-9]+[a-z]+)+$" $clean) }}
{{- fail (printf "config.%s: cannot read %q as a duration (\"5s\", \"2m\", \"1h 30m\")" $name $text) }}
{{- end }}
{{- $total := 0.0 }}
{{- range $part := regexFindAll "[0-9]+[a-z]+" $clean -1 }}
{{- $number := regexFind "^[0-9]+" $part }}
{{- $unit := trimPrefix $number $part }}
{{- if not (hasKey $units $unit) }}
{{- fail (printf "config.%s: unknown duration unit %q in %q" $name $unit $text) }}
{{- end }}
{{- $total = addf $total (mulf (float64 $number) (get $units $unit)) }}
{{- end }}
{{- ceil $total | int64 }}
{{- end }}

{{/* shutdown.grace + shutdown.drain, in whole seconds (rounded up), from the rendered configuration. */}}
{{- define "crier.shutdownSeconds" -}}
{{- $config := include "crier.config" . | fromJson }}
{{- $shutdown := get $config "shutdown" | default dict }}
{{- $grace := include "crier.durationMs" (list "shutdown.grace" (get $shutdown "grace" | default "5s")) }}
{{- $drain := include "crier.durationMs" (list "shutdown.drain" (get $shutdown "drain" | default "10s")) }}
{{- ceil (divf (add (int64 $grace) (int64 $drain)) 1000) | int64 }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the value when set (it must exceed grace +
drain), else grace + drain + terminationGracePeriodMarginSeconds.
*/}}
{{- define "crier.terminationGracePeriodSeconds" -}}
{{- $needed := include "crier.shutdownSeconds" . | int64 }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed .Values.terminationGracePeriodMarginSeconds }}
{{- else if le (int64 .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.shutdown.grace + config.shutdown.drain (%d s), or the pods are killed mid-drain; leave it null to compute it" .Values.terminationGracePeriodSeconds $needed) }}
{{- else }}
{{- int64 .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* The port crier listens on, from config.listen ("0.0.0.0:8080", "[::]:8080"). */}}
{{- define "crier.containerPort" -}}
{{- $config := include "crier.config" . | fromJson }}
{{- $listen := get $config "listen" | default "0.0.0.0:8080" }}
{{- splitList ":" $listen | last | int }}
{{- end }}

{{/*
The Ingress rules as a dict {"rules": [{"host": "...", "paths": [{"path", "pathType"}]}]}.
Each ingress.hosts entry is a host name ("events.example.com") or a map
{host, paths}; an entry without paths (or with an empty list) gets
ingress.paths, the default list. A path is "/sse" (Prefix) or {path,
pathType}. No hosts at all: one rule for any host, with ingress.paths.
*/}}
{{- define "crier.ingressRules" -}}
{{- $ingress := .Values.ingress | default dict }}
{{- $default := $ingress.paths | default list }}
{{- $hosts := $ingress.hosts | default (list "") }}
{{- $rules := list }}
{{- range $entry := $hosts }}
{{- $host := "" }}
{{- $paths := $default }}
{{- if kindIs "string" $entry }}
{{- $host = $entry }}
{{- else }}
{{- $host = get $entry "host" | default "" }}
{{- $paths = get $entry "paths" | default $default }}
{{- end }}
{{- $normalized := list }}
{{- range $p := $paths }}
{{- if kindIs "string" $p }}
{{- $normalized = append $normalized (dict "path" $p "pathType" "Prefix") }}
{{- else }}
{{- $normalized = append $normalized (dict "path" (get $p "path") "pathType" (get $p "pathType" | default "Prefix")) }}
{{- end }}
{{- end }}
{{- if not $normalized }}
{{- fail (printf "ingress.hosts: %q has no paths and ingress.paths is empty: nothing to route" $host) }}
{{- end }}
{{- $rules = append $rules (dict "host" $host "paths" $normalized) }}
{{- end }}
{{- toJson (dict "rules" $rules) }}
{{- end }}

{{/*
redis-cli and its TLS options for crier's Redis, from the rendered
configuration: "--tls" when the URL (or a Sentinel or Cluster node) is
rediss://, "--cacert ca.crt" when a CA is configured, "--cert tls.crt --key
tls.key" with a client certificate. Returns a dict {"cli", "tls", "ca", "cert"}.
*/}}
{{- define "crier.redisCli" -}}
{{- $config := include "crier.config" . | fromJson }}
{{- $redis := get $config "redis" | default dict }}
{{- $urls := list (get $redis "url" | default "") }}
{{- with get $redis "sentinel" }}{{ $urls = concat $urls (get . "nodes" | default list) }}{{ end }}
{{- with get $redis "cluster" }}{{ $urls = concat $urls (get . "nodes" | default list) }}{{ end }}
{{- $tls := false }}
{{- range $urls }}{{ if hasPrefix "rediss://" (toString .) }}{{ $tls = true }}{{ end }}{{ end }}
{{- $files := get $redis "tls" | default dict }}
{{- $cli := "redis-cli" }}
{{- if $tls }}
{{- $cli = printf "%s --tls" $cli }}
{{- if get $files "ca_file" }}{{ $cli = printf "%s --cacert ca.crt" $cli }}{{ end }}
{{- if get $files "cert_file" }}{{ $cli = printf "%s --cert tls.crt --key tls.key" $cli }}{{ end }}
{{- end }}
{{- toJson (dict "cli" $cli "tls" $tls "ca" (get $files "ca_file" | default "") "cert" (get $files "cert_file" | default "")) }}
{{- end }}
