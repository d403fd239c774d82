{{/*
Names, labels, images, security contexts and the pieces every workload shares. Helpers that
take more than the root context are called with a dict: (dict "root" $ "component" "ingest").
*/}}

{{- define "vigil.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or the release name alone when it already contains the chart name. */}}
{{- define "vigil.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's resource name: <fullname>-<component>, within the 63 characters of a DNS label. */}}
{{- define "vigil.componentName" -}}
{{- $suffix := printf "-%s" .component -}}
{{- printf "%s%s" (include "vigil.fullname" .root | trunc (int (sub 63 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- end -}}

{{- define "vigil.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vigil.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vigil.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "vigil.labels" -}}
{{ include "vigil.selectorLabels" . }}
app.kubernetes.io/part-of: vigil
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "vigil.chart" .root }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "vigil.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "vigil.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* <registry>/<name>:<tag>; the tag falls back to image.tag, then to the chart's appVersion. */}}
{{- define "vigil.image" -}}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .root.Values.image.registry) .image.name (toString $tag) -}}
{{- end -}}

{{/* A number as an integer (YAML numbers reach templates as float64, which print as 6.7e+07). */}}
{{- define "vigil.int" -}}
{{- int64 . -}}
{{- end -}}

{{/* An IntOrString: a count as an integer, a percentage ("25%") as a string. */}}
{{- define "vigil.intOrPercent" -}}
{{- if kindIs "string" . -}}{{ quote . }}{{- else -}}{{ int64 . }}{{- end -}}
{{- end -}}

{{- define "vigil.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ include "vigil.int" .Values.securityContext.runAsUser }}
runAsGroup: {{ include "vigil.int" .Values.securityContext.runAsGroup }}
fsGroup: {{ include "vigil.int" .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "vigil.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ include "vigil.int" .Values.securityContext.runAsUser }}
runAsGroup: {{ include "vigil.int" .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The pod spec fields every workload shares: service account, pull secrets, scheduling. */}}
{{- define "vigil.podCommon" -}}
{{- $values := .values -}}
serviceAccountName: {{ include "vigil.serviceAccountName" .root }}
automountServiceAccountToken: false
# No <SERVICE>_PORT variables: a Service named model-server, processor, alerts or ingest
# would put MODEL_SERVER_PORT=tcp://... (or PROCESSOR_*/ALERTS_*/INGEST_*) into the
# services' own env prefixes.
enableServiceLinks: false
terminationGracePeriodSeconds: {{ include "vigil.int" $values.terminationGracePeriodSeconds }}
securityContext:
  {{- include "vigil.podSecurityContext" .root | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod template metadata: selector labels, pod labels, and the chart's annotations (.annotations, e.g. config checksums) with the pod annotations. */}}
{{- define "vigil.podMetadata" -}}
labels:
  {{- include "vigil.selectorLabels" . | nindent 2 }}
  app.kubernetes.io/part-of: vigil
  {{- with .values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- $annotations := merge (dict) (.annotations | default dict) (.values.podAnnotations | default dict) }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
The pod's own name and namespace (downward API), and with otel.endpoint set the
OpenTelemetry SDK variables; with it empty, no OTEL_* variable is set.
*/}}
{{- define "vigil.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- with .root.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ $.serviceName | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),service.instance.id=$(POD_NAME)"
{{- end }}
{{- end -}}

{{/* librdkafka's security.protocol for the kafka.sasl / kafka.tls settings (empty: PLAINTEXT). */}}
{{- define "vigil.kafka.securityProtocol" -}}
{{- $kafka := .Values.kafka -}}
{{- if and $kafka.sasl.enabled $kafka.tls.enabled -}}SASL_SSL
{{- else if $kafka.sasl.enabled -}}SASL_PLAINTEXT
{{- else if $kafka.tls.enabled -}}SSL
{{- end -}}
{{- end -}}

{{- define "vigil.kafka.tlsDir" -}}/etc/vigil/kafka-tls{{- end -}}
{{- define "vigil.mqtt.tlsDir" -}}/etc/vigil/mqtt-tls{{- end -}}
{{/* "true" when the MQTT URL given as the context is TLS (mqtts:// or ssl://), else empty. */}}
{{- define "vigil.mqtt.isTls" -}}
{{- if or (hasPrefix "mqtts://" .) (hasPrefix "ssl://" .) }}true{{ end -}}
{{- end -}}

{{/*
The librdkafka properties of ingest's, the stream processor's and alerts' Kafka clients, as
YAML (a map): brokers, security and TLS files from the values, then kafka.properties on top.
The SASL username and password are not here: they come from the Secret as environment
variables.
The model server's rollout clients on kafka.brokers take them too
(vigil.modelServer.rolloutKafkaProperties).
*/}}
{{- define "vigil.kafka.properties" -}}
{{- $kafka := .Values.kafka -}}
{{- $props := dict "bootstrap.servers" $kafka.brokers -}}
{{- $protocol := include "vigil.kafka.securityProtocol" . -}}
{{- if $protocol -}}
{{- $_ := set $props "security.protocol" $protocol -}}
{{- end -}}
{{- if $kafka.sasl.enabled -}}
{{- $_ := set $props "sasl.mechanism" $kafka.sasl.mechanism -}}
{{- end -}}
{{- if and $kafka.tls.enabled $kafka.tls.existingSecret -}}
{{- $dir := include "vigil.kafka.tlsDir" . -}}
{{- with $kafka.tls.caKey -}}
{{- $_ := set $props "ssl.ca.location" (printf "%s/%s" $dir .) -}}
{{- end -}}
{{- with $kafka.tls.certKey -}}
{{- $_ := set $props "ssl.certificate.location" (printf "%s/%s" $dir .) -}}
{{- end -}}
{{- with $kafka.tls.keyKey -}}
{{- $_ := set $props "ssl.key.location" (printf "%s/%s" $dir .) -}}
{{- end -}}
{{- end -}}
{{- toYaml (merge (fromYaml (include "vigil.stringMap" $kafka.properties)) $props) -}}
{{- end -}}

{{/*
A map with every value as a string, as YAML: librdkafka takes every property as a string
(the services refuse `"linger.ms" = 5`), while a values file naturally says `linger.ms: 5`.
*/}}
{{- define "vigil.stringMap" -}}
{{- $out := dict -}}
{{- range $key, $value := . -}}
{{- if or (kindIs "float64" $value) (kindIs "float32" $value) -}}
{{- $_ := set $out $key (ternary (toString (int64 $value)) (toJson $value) (eq (float64 $value) (floor $value))) -}}
{{- else -}}
{{- $_ := set $out $key (toString $value) -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
The SASL credentials as <prefix>KAFKA__SASL_USERNAME / _PASSWORD (the services' environment
layer turns KAFKA__SASL_USERNAME into the librdkafka property sasl.username).
*/}}
{{- define "vigil.kafka.saslEnv" -}}
{{- $sasl := .root.Values.kafka.sasl -}}
{{- if $sasl.enabled -}}
- name: {{ .prefix }}KAFKA__SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $sasl.existingSecret }}
      key: {{ $sasl.usernameKey }}
- name: {{ .prefix }}KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $sasl.existingSecret }}
      key: {{ $sasl.passwordKey }}
{{- end -}}
{{- end -}}

{{- define "vigil.kafka.tlsVolume" -}}
{{- $tls := .Values.kafka.tls -}}
{{- if and $tls.enabled $tls.existingSecret -}}
- name: kafka-tls
  secret:
    secretName: {{ $tls.existingSecret }}
    defaultMode: 0440
{{- end -}}
{{- end -}}

{{- define "vigil.kafka.tlsMount" -}}
{{- $tls := .Values.kafka.tls -}}
{{- if and $tls.enabled $tls.existingSecret -}}
- name: kafka-tls
  mountPath: {{ include "vigil.kafka.tlsDir" . }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/* A probe's timings from <component>.probes.<kind>. */}}
{{- define "vigil.probeTimings" -}}
periodSeconds: {{ include "vigil.int" .periodSeconds }}
timeoutSeconds: {{ include "vigil.int" .timeoutSeconds }}
failureThreshold: {{ include "vigil.int" .failureThreshold }}
{{- end -}}

{{/*
TOML rendering of a values map, for the files the services read: scalars and arrays first,
then sub-tables ([a.b]) and arrays of tables ([[a.b]]), keys sorted; null values are left
out (the service's default applies). Called with (dict "table" $map "path" (list)).
*/}}
{{- define "vigil.toml.table" -}}
{{- $table := .table -}}
{{- $path := .path -}}
{{- range $key := keys $table | sortAlpha -}}
{{- $value := index $table $key -}}
{{- if not (or (kindIs "invalid" $value) (kindIs "map" $value) (include "vigil.toml.isTableArray" $value)) }}
{{ include "vigil.toml.key" $key }} = {{ include "vigil.toml.value" $value }}
{{- end -}}
{{- end -}}
{{- range $key := keys $table | sortAlpha -}}
{{- $value := index $table $key -}}
{{- $sub := append $path $key -}}
{{- if kindIs "map" $value }}

[{{ include "vigil.toml.path" $sub }}]
{{- include "vigil.toml.table" (dict "table" $value "path" $sub) -}}
{{- else if include "vigil.toml.isTableArray" $value -}}
{{- range $item := $value }}

[[{{ include "vigil.toml.path" $sub }}]]
{{- include "vigil.toml.table" (dict "table" $item "path" $sub) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Non-empty when the value is a list of maps (a TOML array of tables). */}}
{{- define "vigil.toml.isTableArray" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) -}}
{{- if kindIs "map" (first .) -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vigil.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toRawJson . }}{{- end -}}
{{- end -}}

{{- define "vigil.toml.path" -}}
{{- $keys := list -}}
{{- range . -}}{{- $keys = append $keys (include "vigil.toml.key" .) -}}{{- end -}}
{{- join "." $keys -}}
{{- end -}}

{{/* A scalar or an array of scalars; JSON string escapes are valid in TOML basic strings. */}}
{{- define "vigil.toml.value" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}{{ toRawJson $v }}
{{- else if kindIs "bool" $v -}}{{ $v }}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) -}}
{{- if eq (float64 $v) (floor $v) -}}{{ int64 $v }}{{- else -}}{{ toJson $v }}{{- end -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "int32" $v) (kindIs "uint64" $v) -}}{{ $v }}
{{- else if kindIs "slice" $v -}}
[{{- range $i, $e := $v -}}{{- if $i }}, {{ end -}}{{- include "vigil.toml.value" $e -}}{{- end -}}]
{{- else -}}
{{- fail (printf "cannot write %v (a %s) into a TOML config file" $v (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{/* An autoscaling/v2 HorizontalPodAutoscaler for a component's Deployment. */}}
{{- define "vigil.hpa" -}}
{{- $scaling := .values.autoscaling -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "vigil.componentName" . }}
  labels:
    {{- include "vigil.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "vigil.componentName" . }}
  minReplicas: {{ include "vigil.int" $scaling.minReplicas }}
  maxReplicas: {{ include "vigil.int" $scaling.maxReplicas }}
  metrics:
    {{- if not (kindIs "invalid" $scaling.targetCPUUtilizationPercentage) }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ include "vigil.int" $scaling.targetCPUUtilizationPercentage }}
    {{- end }}
    {{- if not (kindIs "invalid" $scaling.targetMemoryUtilizationPercentage) }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ include "vigil.int" $scaling.targetMemoryUtilizationPercentage }}
    {{- end }}
    {{- with .extraMetrics }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* A policy/v1 PodDisruptionBudget for a component's pods. */}}
{{- define "vigil.pdb" -}}
{{- $pdb := .values.podDisruptionBudget -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "vigil.componentName" . }}
  labels:
    {{- include "vigil.labels" . | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" $pdb.minAvailable) }}
  minAvailable: {{ include "vigil.intOrPercent" $pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ include "vigil.intOrPercent" $pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "vigil.selectorLabels" . | nindent 6 }}
{{- end -}}

{{- define "vigil.networkPolicy.egressTo" -}}
- ports:
    {{- range .ports }}
    - port: {{ include "vigil.int" . }}
      protocol: TCP
    {{- end }}
  {{- with .to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/*
Egress every Vigil pod needs: DNS, the OpenTelemetry collector (with otel.endpoint, for the
pods that send traces: .traces), and networkPolicy.extraEgress. Called with
(dict "root" $ "traces" true).
*/}}
{{- define "vigil.networkPolicy.commonEgress" -}}
{{- $np := .root.Values.networkPolicy -}}
- ports:
    - port: {{ include "vigil.int" $np.dns.port }}
      protocol: UDP
    - port: {{ include "vigil.int" $np.dns.port }}
      protocol: TCP
  {{- with $np.dns.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- if and .traces .root.Values.otel.endpoint }}
{{ include "vigil.networkPolicy.egressTo" $np.otel }}
{{- end }}
{{- with $np.extraEgress }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The model server's TLS and token (modelServer.security): where the Secrets are mounted,
their names, and the DNS names its certificate must carry (the processor checks the
headless Service's name; clients of the other Service, its).
*/}}
{{- define "vigil.modelServer.tlsDir" -}}/etc/vigil/model-server-tls{{- end -}}
{{- define "vigil.modelServer.tokenDir" -}}/etc/vigil/model-server-token{{- end -}}
{{- define "vigil.modelServer.tls" -}}
{{- if and .Values.modelServer.enabled .Values.modelServer.security.tls.enabled }}true{{ end -}}
{{- end -}}
{{- define "vigil.modelServer.tlsSecretName" -}}
{{- $tls := .Values.modelServer.security.tls -}}
{{- if eq $tls.source "secret" -}}
{{- $tls.existingSecret -}}
{{- else -}}
{{- include "vigil.componentName" (dict "root" . "component" "model-server-tls") -}}
{{- end -}}
{{- end -}}
{{- define "vigil.modelServer.tokenSecretName" -}}
{{- $token := .Values.modelServer.security.managementToken -}}
{{- $token.existingSecret | default (include "vigil.componentName" (dict "root" . "component" "model-server-token")) -}}
{{- end -}}
{{- define "vigil.modelServer.dnsNames" -}}
{{- $ns := .Release.Namespace -}}
{{- range $component := list "model-server" "model-server-headless" }}
{{- $name := include "vigil.componentName" (dict "root" $ "component" $component) }}
- {{ $name }}
- {{ $name }}.{{ $ns }}
- {{ $name }}.{{ $ns }}.svc
- {{ $name }}.{{ $ns }}.svc.cluster.local
{{- end }}
{{- end -}}
