{{/* Chart name. */}}
{{- define "crier.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, prefixed unless it already contains the chart name. */}}
{{- define "crier.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
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
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
.Values.config as TOML. Values are written with toJson, whose strings,
numbers (whole numbers without a decimal point), booleans and arrays of
those are valid TOML. Top-level values come first, then [tables], then
[[arrays of tables]].
*/}}
{{- define "crier.toml" -}}
{{- $config := .Values.config }}
{{- range $key, $value := $config }}
{{- if not (or (kindIs "map" $value) (include "crier.isTableArray" $value)) }}
{{ $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
{{- range $key, $value := $config }}
{{- if kindIs "map" $value }}

[{{ $key }}]
{{- include "crier.tomlPairs" (list $key $value) }}
{{- else if include "crier.isTableArray" $value }}
{{- range $value }}

[[{{ $key }}]]
{{- include "crier.tomlPairs" (list $key .) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when the value is a non-empty list of maps. */}}
{{- define "crier.isTableArray" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) (kindIs "map" (first .)) }}true{{ end }}
{{- end }}

{{/* The key = value lines of one table; takes (list tableName map). */}}
{{- define "crier.tomlPairs" -}}
{{- $table := index . 0 }}
{{- range $key, $value := index . 1 }}
{{- if or (kindIs "map" $value) (include "crier.isTableArray" $value) }}
{{- fail (printf "config.%s.%s: crier's configuration is at most two levels deep" $table $key) }}
{{- end }}
{{ $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
