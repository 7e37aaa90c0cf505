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
{{- define "authsync.ingestSelectorLabels" -}}
app.kubernetes.io/name: {{ include "authsync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: ingest
{{- end }}

{{- define "authsync.labels" -}}
helm.sh/chart: {{ include "authsync.chart" . }}
{{ include "authsync.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels of the migration hook objects (component: migration, so no worker selector matches).
*/}}
{{- define "authsync.migrationLabels" -}}
helm.sh/chart: {{ include "authsync.chart" . }}
app.kubernetes.io/name: {{ include "authsync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: migration
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels of the worker pods (Deployment, Service, PodDisruptionBudget, ServiceMonitor).
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

{{/* Name of the migration hook Job (and of its ConfigMap / ServiceAccount). */}}
{{- define "authsync.migrationName" -}}
{{- printf "%s-migrate" (include "authsync.fullname" .) | trunc 63 | trimSuffix "-" }}
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
{{- $_ := set $http "listen" (printf "[::]:%d" (int .Values.containerPort)) }}
{{- $_ := set $config "http" $http }}
{{- $ingest := get $config "ingest" | default dict }}
{{- if hasKey $ingest "listen" }}
{{- fail "config.ingest.listen is set by the chart: change ingest.containerPort instead" }}
{{- end }}
{{- if .Values.ingest.enabled }}
{{- $_ := set $ingest "listen" (printf "[::]:%d" (int .Values.ingest.containerPort)) }}
{{- $_ := set $config "ingest" $ingest }}
{{- end }}
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
{{- if and (eq $section "identity") (or (eq $key "role_sets") (eq $key "connections")) }}
{{- /* arrays of tables: rendered at the end */}}
{{- else if kindIs "map" $value }}
{{- if $value }}{{ $_ := set $tables $key $value }}{{ end }}
{{- else if not (kindIs "invalid" $value) }}
{{- $lines = append $lines (printf "%s = %s" (include "authsync.tomlKey" $key) (toJson $value)) }}
{{- end }}
{{- end }}
{{- range $table, $entries := $tables }}
{{- if or (and (eq $section "trust") (eq $table "sources")) (and (eq $section "ingest") (eq $table "endpoints")) }}
{{- /* a table per name: [trust.sources.<name>] with TOML (JSON-compatible) values */}}
{{- range $name, $entry := $entries }}
{{- $lines = append $lines "" }}
{{- $lines = append $lines (printf "[%s.%s.%s]" (include "authsync.tomlKey" $section) (include "authsync.tomlKey" $table) (include "authsync.tomlKey" $name)) }}
{{- range $key, $value := $entry }}
{{- $lines = append $lines (printf "%s = %s" (include "authsync.tomlKey" $key) (toJson $value)) }}
{{- end }}
{{- end }}
{{- else }}
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
{{- end }}
{{- /* identity.role_sets: [[identity.role_sets]] with its [[identity.role_sets.rules]] */}}
{{- range $set := ((get $config "identity" | default dict).role_sets | default list) }}
{{- $lines = append $lines "" }}
{{- $lines = append $lines "[[identity.role_sets]]" }}
{{- range $key, $value := $set }}
{{- if ne $key "rules" }}
{{- $lines = append $lines (printf "%s = %s" (include "authsync.tomlKey" $key) (toJson $value)) }}
{{- end }}
{{- end }}
{{- range $rule := ($set.rules | default list) }}
{{- $lines = append $lines "[[identity.role_sets.rules]]" }}
{{- range $key, $value := $rule }}
{{- $lines = append $lines (printf "%s = %s" (include "authsync.tomlKey" $key) (toJson $value)) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* identity.connections: [[identity.connections]] */}}
{{- range $conn := ((get $config "identity" | default dict).connections | default list) }}
{{- $lines = append $lines "" }}
{{- $lines = append $lines "[[identity.connections]]" }}
{{- range $key, $value := $conn }}
{{- $lines = append $lines (printf "%s = %s" (include "authsync.tomlKey" $key) (toJson $value)) }}
{{- end }}
{{- end }}
{{- join "\n" $lines }}
{{- end }}

{{/*
Effective librdkafka security.protocol / sasl.mechanism: the kafka.* value, else the one in
config.kafka.properties, else "".
*/}}
{{- define "authsync.kafkaProperty" -}}
{{- $props := ((.root.Values.config | default dict).kafka | default dict).properties | default dict }}
{{- .value | default (get $props .name) | default "" }}
{{- end }}
{{- define "authsync.kafkaSecurityProtocol" -}}
{{- include "authsync.kafkaProperty" (dict "root" . "value" .Values.kafka.securityProtocol "name" "security.protocol") | upper }}
{{- end }}
{{- define "authsync.kafkaSaslMechanism" -}}
{{- include "authsync.kafkaProperty" (dict "root" . "value" .Values.kafka.sasl.mechanism "name" "sasl.mechanism") | upper }}
{{- end }}

{{/* Where Kafka TLS material is mounted (outside the config mount). */}}
{{- define "authsync.kafkaCaDir" -}}/etc/authsync-kafka/ca{{- end }}
{{- define "authsync.kafkaCaPath" -}}{{ include "authsync.kafkaCaDir" . }}/ca.crt{{- end }}
{{- define "authsync.kafkaClientCertDir" -}}/etc/authsync-kafka/client{{- end }}

{{/*
Check: a setting given both as a kafka.* value and in config.kafka.properties (the
environment variable would silently win).
*/}}
{{- define "authsync.checkKafkaSettings" -}}
{{- $props := ((.Values.config | default dict).kafka | default dict).properties | default dict }}
{{- $k := .Values.kafka }}
{{- if and $k.securityProtocol (hasKey $props "security.protocol") }}
{{- fail "kafka.securityProtocol and config.kafka.properties.security.protocol are both set: keep one" }}
{{- end }}
{{- if and $k.sasl.mechanism (hasKey $props "sasl.mechanism") }}
{{- fail "kafka.sasl.mechanism and config.kafka.properties.sasl.mechanism are both set: keep one" }}
{{- end }}
{{- $mechanism := include "authsync.kafkaSaslMechanism" . }}
{{- if and $mechanism (not (has $mechanism (list "PLAIN" "SCRAM-SHA-256" "SCRAM-SHA-512"))) }}
{{- fail (printf "Kafka SASL mechanism %q is not supported: authsync's librdkafka is built without Kerberos (GSSAPI) and without an OAUTHBEARER token provider; use PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512" $mechanism) }}
{{- end }}
{{- if and (hasPrefix "SASL_" (include "authsync.kafkaSecurityProtocol" .)) (not $mechanism) }}
{{- fail "Kafka security protocol SASL_* needs kafka.sasl.mechanism (librdkafka would default to GSSAPI, which authsync does not support)" }}
{{- end }}
{{- if and (or $k.tls.ca.existingSecret $k.tls.ca.existingConfigMap) (hasKey $props "ssl.ca.location") }}
{{- fail "config.kafka.properties.ssl.ca.location must not be set together with kafka.tls.ca: the chart mounts the CA and sets ssl.ca.location itself" }}
{{- end }}
{{- if and $k.tls.ca.existingSecret $k.tls.ca.existingConfigMap }}
{{- fail "kafka.tls.ca: set existingSecret or existingConfigMap, not both" }}
{{- end }}
{{- if and $k.tls.clientCert.existingSecret (or (hasKey $props "ssl.certificate.location") (hasKey $props "ssl.key.location")) }}
{{- fail "config.kafka.properties.ssl.certificate.location / ssl.key.location must not be set together with kafka.tls.clientCert" }}
{{- end }}
{{- end }}

{{/*
Environment of every authsync container (the worker and the migration Job): secrets and
Kafka security settings first, then extraEnv. librdkafka properties are passed as
AUTHSYNC_KAFKA_PROPERTY_<NAME> (`_` becomes `.`).
*/}}
{{- define "authsync.env" -}}
{{- include "authsync.checkKafkaSettings" . -}}
- name: AUTHSYNC_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "authsync.databaseSecretName" . }}
      key: {{ .Values.database.existingSecretKey }}
{{- with .Values.kafka.securityProtocol }}
- name: AUTHSYNC_KAFKA_PROPERTY_SECURITY_PROTOCOL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.kafka.sasl }}
{{- if .mechanism }}
- name: AUTHSYNC_KAFKA_PROPERTY_SASL_MECHANISM
  value: {{ .mechanism | quote }}
{{- end }}
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
{{- if or .Values.kafka.tls.ca.existingSecret .Values.kafka.tls.ca.existingConfigMap }}
- name: AUTHSYNC_KAFKA_PROPERTY_SSL_CA_LOCATION
  value: {{ include "authsync.kafkaCaPath" . | quote }}
{{- end }}
{{- with .Values.kafka.tls.clientCert }}
{{- if .existingSecret }}
- name: AUTHSYNC_KAFKA_PROPERTY_SSL_CERTIFICATE_LOCATION
  value: {{ printf "%s/tls.crt" (include "authsync.kafkaClientCertDir" $) | quote }}
- name: AUTHSYNC_KAFKA_PROPERTY_SSL_KEY_LOCATION
  value: {{ printf "%s/tls.key" (include "authsync.kafkaClientCertDir" $) | quote }}
{{- if .keyPasswordKey }}
- name: AUTHSYNC_KAFKA_PROPERTY_SSL_KEY_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .keyPasswordKey }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Volume mounts / volumes of every authsync container: the config file, /tmp, the Kafka TLS
material, then the extra ones. `configMapName` selects the ConfigMap (the migration Job
uses its own hook ConfigMap).
*/}}
{{- define "authsync.volumeMounts" -}}
- name: config
  mountPath: {{ include "authsync.configDir" . }}
  readOnly: true
# Writable scratch space: the root filesystem is read-only.
- name: tmp
  mountPath: /tmp
{{- if or .Values.kafka.tls.ca.existingSecret .Values.kafka.tls.ca.existingConfigMap }}
- name: kafka-ca
  mountPath: {{ include "authsync.kafkaCaDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.kafka.tls.clientCert.existingSecret }}
- name: kafka-client-cert
  mountPath: {{ include "authsync.kafkaClientCertDir" . }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "authsync.volumes" -}}
{{- $root := .root -}}
- name: config
  configMap:
    name: {{ .configMapName }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- with $root.Values.kafka.tls.ca }}
{{- if .existingSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .existingSecret }}
    items:
      - key: {{ .key }}
        path: ca.crt
{{- else if .existingConfigMap }}
- name: kafka-ca
  configMap:
    name: {{ .existingConfigMap }}
    items:
      - key: {{ .key }}
        path: ca.crt
{{- end }}
{{- end }}
{{- with $root.Values.kafka.tls.clientCert }}
{{- if .existingSecret }}
- name: kafka-client-cert
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 0400
    items:
      - key: {{ .certKey }}
        path: tls.crt
      - key: {{ .keyKey }}
        path: tls.key
{{- end }}
{{- end }}
{{- with $root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
data of the config ConfigMap (shared by the chart's ConfigMap and the migration hook's).
*/}}
{{- define "authsync.configMapData" -}}
authsync.toml: |
  # Rendered by the authsync Helm chart from .Values.config.
  # Secrets (database URL, Kafka credentials) come from environment variables.
  {{- include "authsync.configToml" . | nindent 2 }}
{{- end }}

{{/*
Number of worker replicas KEDA may scale to: keda.maxReplicaCount, else the partition
count of the login topic (config.topics.partitions): more pods than partitions sit idle.
*/}}
{{- define "authsync.kedaMaxReplicas" -}}
{{- $topics := (.Values.config | default dict).topics | default dict }}
{{- if .Values.keda.maxReplicaCount }}{{ int .Values.keda.maxReplicaCount }}{{ else }}{{ int (get $topics "partitions" | default 6) }}{{ end }}
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

{{/*
Topology spread of a Deployment's pods: topologySpreadConstraints if given; otherwise, with
defaultTopologySpread, across zones and then nodes (maxSkew 1, ScheduleAnyway: a preference
that never keeps a pod Pending). Call with (dict "root" $ "selector" <selector labels>).
*/}}
{{- define "authsync.topologySpread" -}}
{{- $root := .root }}
{{- if $root.Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml $root.Values.topologySpreadConstraints | nindent 2 }}
{{- else if $root.Values.defaultTopologySpread }}
topologySpreadConstraints:
  {{- range list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
  - maxSkew: 1
    topologyKey: {{ . }}
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- $.selector | nindent 8 }}
    matchLabelKeys:
      - pod-template-hash
  {{- end }}
{{- end }}
{{- end }}
