{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "authsync.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, plus the chart name unless it already holds it.
*/}}
{{- define "authsync.fullname" -}}
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

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "authsync.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "authsync.labels" -}}
helm.sh/chart: {{ include "authsync.chart" . }}
{{ include "authsync.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels of the worker pods (also for a later PodDisruptionBudget / ServiceMonitor).
*/}}
{{- define "authsync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "authsync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end }}

{{/*
Name of the ServiceAccount to use.
*/}}
{{- define "authsync.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "authsync.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Container image reference: repository@digest, else repository:tag (tag defaults to appVersion).
*/}}
{{- define "authsync.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the database URL.
*/}}
{{- define "authsync.databaseSecretName" -}}
{{- default (printf "%s-database" (include "authsync.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{/*
Name of the ConfigMap holding authsync.toml.
*/}}
{{- define "authsync.configMapName" -}}
{{- printf "%s-config" (include "authsync.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Where the config file is mounted, and its path. */}}
{{- define "authsync.configDir" -}}/etc/authsync{{- end }}
{{- define "authsync.configPath" -}}{{ include "authsync.configDir" . }}/authsync.toml{{- end }}

{{/*
The effective config map: .Values.config plus what the chart itself owns (http.listen).
Fails on settings that must not live in a ConfigMap.
Returns YAML; use with fromYaml.
*/}}
{{- define "authsync.effectiveConfig" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- range $section, $fields := $config }}
{{- if not (kindIs "map" $fields) }}
{{- fail (printf "config.%s must be a section (a map of settings), got %v" $section $fields) }}
{{- end }}
{{- end }}
{{- $database := get $config "database" | default dict }}
{{- if hasKey $database "url" }}
{{- fail "config.database.url must not be set: the URL carries a password; put it in a Secret and set database.existingSecret" }}
{{- end }}
{{- $kafka := get $config "kafka" | default dict }}
{{- range $name, $_ := (get $kafka "properties" | default dict) }}
{{- if or (contains "password" (lower $name)) (contains "secret" (lower $name)) }}
{{- fail (printf "config.kafka.properties.%s looks like a credential: pass it from a Secret (kafka.sasl or extraEnv with AUTHSYNC_KAFKA_PROPERTY_*)" $name) }}
{{- end }}
{{- end }}
{{- $http := get $config "http" | default dict }}
{{- if hasKey $http "listen" }}
{{- fail "config.http.listen is set by the chart: change containerPort instead" }}
{{- end }}
{{- $_ := set $http "listen" (printf "0.0.0.0:%d" (int .Values.containerPort)) }}
{{- $_ := set $config "http" $http }}
{{- toYaml $config }}
{{- end }}

{{/*
A TOML key: bare when it may be, quoted otherwise (e.g. librdkafka's dotted names).
*/}}
{{- define "authsync.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/*
Renders the effective config as TOML. Scalars go through toJson: JSON strings, integers
and booleans are valid TOML, and integers never come out in exponent form. Sub-tables
(kafka.properties) hold librdkafka properties, whose values are always strings.
*/}}
{{- define "authsync.configToml" -}}
{{- $config := include "authsync.effectiveConfig" . | fromYaml }}
{{- $lines := list }}
{{- range $section, $fields := $config }}
{{- $tables := dict }}
{{- $lines = append $lines "" }}
{{- $lines = append $lines (printf "[%s]" (include "authsync.tomlKey" $section)) }}
{{- range $key, $value := $fields }}
{{- if kindIs "map" $value }}
{{- if $value }}{{ $_ := set $tables $key $value }}{{ end }}
{{- else if not (kindIs "invalid" $value) }}
{{- $lines = append $lines (printf "%s = %s" (include "authsync.tomlKey" $key) (toJson $value)) }}
{{- end }}
{{- end }}
{{- range $table, $entries := $tables }}
{{- $lines = append $lines "" }}
{{- $lines = append $lines (printf "[%s.%s]" (include "authsync.tomlKey" $section) (include "authsync.tomlKey" $table)) }}
{{- range $key, $value := $entries }}
{{- if not (kindIs "invalid" $value) }}
{{- $text := $value }}
{{- if not (kindIs "string" $value) }}{{ $text = toJson $value }}{{ end }}
{{- $lines = append $lines (printf "%s = %s" (include "authsync.tomlKey" $key) (toJson $text)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- join "\n" $lines }}
{{- end }}

{{/*
Environment of every authsync container (the worker now; a migration Job later):
secrets first, then extraEnv.
*/}}
{{- define "authsync.env" -}}
- name: AUTHSYNC_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "authsync.databaseSecretName" . }}
      key: {{ .Values.database.existingSecretKey }}
{{- with .Values.kafka.sasl }}
{{- if .existingSecret }}
- name: AUTHSYNC_KAFKA_PROPERTY_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .usernameKey }}
- name: AUTHSYNC_KAFKA_PROPERTY_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .passwordKey }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Check: the grace period must outlast the consumer drain plus the final commit.
*/}}
{{- define "authsync.checkGracePeriod" -}}
{{- $consumer := (.Values.config | default dict).consumer | default dict }}
{{- $drainMs := int (get $consumer "drain_timeout_ms" | default 25000) }}
{{- $graceMs := mul (int .Values.terminationGracePeriodSeconds) 1000 }}
{{- if lt $graceMs (add $drainMs 5000) }}
{{- fail (printf "terminationGracePeriodSeconds (%d s) must exceed config.consumer.drain_timeout_ms (%d ms) by at least 5 s, or Kubernetes kills the worker before it has drained and committed" (int .Values.terminationGracePeriodSeconds) $drainMs) }}
{{- end }}
{{- end }}
