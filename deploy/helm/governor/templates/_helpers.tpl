{{/*
The chart name, or nameOverride.
*/}}
{{- define "governor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects, at most 63 characters (a DNS label). The release name
alone when it already contains the chart name.
*/}}
{{- define "governor.fullname" -}}
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
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "governor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "governor.labels" -}}
helm.sh/chart: {{ include "governor.chart" . }}
{{ include "governor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: controller
app.kubernetes.io/part-of: governor
{{- end }}

{{/*
Labels that select the controller's pods (never change them: a Deployment's selector is immutable).
*/}}
{{- define "governor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "governor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount's name.
*/}}
{{- define "governor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "governor.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: repository@digest, else repository:tag (default appVersion).
*/}}
{{- define "governor.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The Lease's name.
*/}}
{{- define "governor.leaseName" -}}
{{- default (include "governor.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
Whether the controller uses a Kubernetes Lease ("true" or "").
*/}}
{{- define "governor.usesLease" -}}
{{- if and .Values.leaderElection.enabled (eq .Values.leaderElection.mode "kubernetes") }}true{{ end }}
{{- end }}

{{/*
Whether the controller needs namespaced permissions, a Role ("true" or "").
*/}}
{{- define "governor.needsRole" -}}
{{- if or (include "governor.usesLease" .) .Values.rbac.kongPlugins .Values.rbac.configMaps }}true{{ end }}
{{- end }}

{{/*
Whether the controller talks to the Kubernetes API at all, then it needs its token
("true" or "").
*/}}
{{- define "governor.usesKubeApi" -}}
{{- if or (include "governor.usesLease" .) .Values.rbac.kongPlugins .Values.rbac.kongClusterPlugins .Values.rbac.configMaps }}true{{ end }}
{{- end }}

{{/*
The name of the policy ConfigMap (the chart's own, or existingConfigMap).
*/}}
{{- define "governor.policiesConfigMap" -}}
{{- default (printf "%s-policies" (include "governor.fullname" .)) .Values.policies.existingConfigMap }}
{{- end }}

{{/*
The chart's Secret's data: key → value, only for credentials given as values (not for those
read from an existingSecret). Rendered as YAML; empty when there is nothing to store.
*/}}
{{- define "governor.secretData" -}}
{{- with .Values.redis }}
{{- if not .existingSecret }}
{{- if .url }}
redis-url: {{ .url | b64enc | quote }}
{{- end }}
{{- if .password }}
redis-password: {{ .password | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.prometheus }}
{{- if not .existingSecret }}
{{- if .password }}
prometheus-password: {{ .password | b64enc | quote }}
{{- end }}
{{- if .bearerToken }}
prometheus-bearer-token: {{ .bearerToken | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.kong.enabled (not .Values.kong.existingSecret) .Values.kong.adminToken }}
kong-admin-token: {{ .Values.kong.adminToken | b64enc | quote }}
{{- end }}
{{- with .Values.gateway }}
{{- if and .enabled (not .existingSecret) }}
{{- if .apiKeySecret }}
gateway-api-key-secret: {{ .apiKeySecret | b64enc | quote }}
{{- end }}
{{- if .upstreamApiKey }}
gateway-upstream-api-key: {{ .upstreamApiKey | b64enc | quote }}
{{- end }}
{{- if .metricsToken }}
gateway-metrics-token: {{ .metricsToken | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
One environment variable read from a Secret. Arguments (a dict):
  name           the variable
  root           the chart's context
  existingSecret a Secret the user manages ("" for the chart's own)
  existingKey    the key in that Secret
  value          the value given in values (used with the chart's own Secret)
  key            the key in the chart's own Secret
  optional       true: a missing key leaves the variable unset
Nothing is rendered when neither a Secret nor a value is given.
*/}}
{{- define "governor.secretEnv" -}}
{{- if .existingSecret }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .existingKey }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- else if .value }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "governor.fullname" .root }}
      key: {{ .key }}
{{- end }}
{{- end }}

{{/*
The gateway's objects' name: the release's full name + "-gateway", at most 63 characters.
*/}}
{{- define "governor.gateway.fullname" -}}
{{- printf "%s-gateway" (include "governor.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/*
Labels that select the gateway's pods. Its own name label: the controller's Service, PDB,
NetworkPolicy and ServiceMonitor select `app.kubernetes.io/name: <name>` and must not catch
gateway pods (and the controller's selector cannot change: a Deployment's is immutable).
*/}}
{{- define "governor.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-gateway" (include "governor.name" . | trunc 55 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of every gateway object.
*/}}
{{- define "governor.gateway.labels" -}}
helm.sh/chart: {{ include "governor.chart" . }}
{{ include "governor.gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: governor
{{- end }}

{{/*
The Redis settings (GOVERNOR_REDIS__*) of the controller and the gateway: they must agree.
*/}}
{{- define "governor.redisEnv" -}}
{{- with include "governor.secretEnv" (dict "root" . "name" "GOVERNOR_REDIS__URL" "existingSecret" .Values.redis.existingSecret "existingKey" .Values.redis.existingSecretUrlKey "value" .Values.redis.url "key" "redis-url") }}
{{ . | trim }}
{{- end }}
{{- with include "governor.secretEnv" (dict "root" . "name" "GOVERNOR_REDIS__PASSWORD" "existingSecret" .Values.redis.existingSecret "existingKey" .Values.redis.existingSecretPasswordKey "value" .Values.redis.password "key" "redis-password" "optional" true) }}
{{ . | trim }}
{{- end }}
{{- with .Values.redis.username }}
- name: GOVERNOR_REDIS__USERNAME
  value: {{ . | quote }}
{{- end }}
- name: GOVERNOR_REDIS__KEY_PREFIX
  value: {{ .Values.redis.keyPrefix | quote }}
{{- end }}

{{/*
The API keys' server secret (GOVERNOR_GATEWAY__API_KEY_SECRET), for the gateway and for the
controller's pods (where `governor keys create` runs): empty without the gateway or a secret.
*/}}
{{- define "governor.gatewayKeyEnv" -}}
{{- with .Values.gateway }}
{{- if .enabled }}
{{- with include "governor.secretEnv" (dict "root" $ "name" "GOVERNOR_GATEWAY__API_KEY_SECRET" "existingSecret" .existingSecret "existingKey" .existingSecretApiKeySecretKey "value" .apiKeySecret "key" "gateway-api-key-secret" "optional" true) }}
{{- . | trim }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Where the controller's telemetry port serves the shipped runbooks and docs (through its
Service): the default base of every runbook link and problem type, so they resolve.
*/}}
{{- define "governor.pagesUrl" -}}
http://{{ include "governor.fullname" . }}.{{ .Release.Namespace }}.svc:{{ .Values.service.port }}/
{{- end }}

{{/* The runbook base of the alerts: prometheusRule.runbookBaseUrl, else the served pages. */}}
{{- define "governor.alertRunbookBase" -}}
{{- .Values.prometheusRule.runbookBaseUrl | default (printf "%srunbooks/" (include "governor.pagesUrl" .)) }}
{{- end }}

{{/*
Where the gateway's metrics token lives, as a secretKeyRef ({name, key}), or "" when /metrics
has none: the gateway's env and the ServiceMonitor's authorization read the same one.
*/}}
{{- define "governor.gateway.metricsTokenRef" -}}
{{- $gw := .Values.gateway -}}
{{- if $gw.existingSecret -}}
{{- if $gw.existingSecretMetricsTokenKey -}}
name: {{ $gw.existingSecret }}
key: {{ $gw.existingSecretMetricsTokenKey }}
{{- end -}}
{{- else if $gw.metricsToken -}}
name: {{ include "governor.fullname" . }}
key: gateway-metrics-token
{{- end -}}
{{- end }}

{{/*
Refuse values that would put a credential where anyone who can read the Deployment sees it:
a secret setting as a plain env value (env, or extraEnv without valueFrom), and a login in a
URL that is passed as a plain value. Each message names the value and where the secret goes.
*/}}
{{- define "governor.refusePlainSecrets" -}}
{{- $fixes := dict
  "GOVERNOR_REDIS__URL" "redis.url (kept in the chart's Secret) or redis.existingSecret"
  "GOVERNOR_REDIS__PASSWORD" "redis.password or redis.existingSecret"
  "GOVERNOR_PROMETHEUS__PASSWORD" "prometheus.password or prometheus.existingSecret"
  "GOVERNOR_PROMETHEUS__BEARER_TOKEN" "prometheus.bearerToken or prometheus.existingSecret"
  "GOVERNOR_KONG__ADMIN_TOKEN" "kong.adminToken or kong.existingSecret"
  "GOVERNOR_KONG__REDIS_PASSWORD" "extraEnv with valueFrom.secretKeyRef"
  "GOVERNOR_GATEWAY__API_KEY_SECRET" "gateway.apiKeySecret or gateway.existingSecret"
  "GOVERNOR_GATEWAY__UPSTREAM_API_KEY" "gateway.upstreamApiKey or gateway.existingSecret"
  "GOVERNOR_GATEWAY__METRICS_TOKEN" "gateway.metricsToken or gateway.existingSecret"
}}
{{- range $name, $_ := .Values.env }}
{{- with get $fixes $name }}
{{- fail (printf "env.%s is a secret and env values are plain text in the Deployment: set it through %s" $name .) }}
{{- end }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if and (hasKey $fixes (toString .name)) (not .valueFrom) }}
{{- fail (printf "extraEnv %s is a secret without valueFrom, so plain text in the Deployment: set it through %s" .name (get $fixes (toString .name))) }}
{{- end }}
{{- end }}
{{- $urls := dict
  "prometheus.url" (list .Values.prometheus.url "prometheus.username and prometheus.password (or prometheus.existingSecret)")
  "kong.adminUrl" (list .Values.kong.adminUrl "kong.adminToken (or kong.existingSecret)")
  "gateway.upstream" (list .Values.gateway.upstream "gateway.upstreamApiKey (or gateway.existingSecret)")
  "gateway.jwt.jwksUrl" (list .Values.gateway.jwt.jwksUrl "a JWKS URL without a login")
}}
{{- range $value, $pair := $urls }}
{{- if regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@" (toString (first $pair)) }}
{{- fail (printf "%s holds a login (user:password@host), which would be plain text in the Deployment: remove it and use %s" $value (last $pair)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Refuse a replica count that is not a whole number of at least 1: Kubernetes takes 0 and runs
no pod, silently (a negative or fractional count is only refused at apply, by the API
server). values.schema.json says the same; this holds when the schema is skipped
(`helm template --skip-schema-validation`, tools that render without it). The argument is a
list: the value's name, the value, what to do instead.
*/}}
{{- define "governor.requireReplicas" -}}
{{- $name := index . 0 }}
{{- $value := index . 1 }}
{{- $number := or (kindIs "int" $value) (kindIs "int64" $value) (kindIs "float64" $value) }}
{{- if or (not $number) (lt (float64 $value) 1.0) (ne (float64 $value) (float64 (int $value))) }}
{{- fail (printf "%s is %#v: it must be a whole number of at least 1 (0 runs no pod at all; a negative or fractional count is refused by Kubernetes); %s" $name $value (index . 2)) }}
{{- end }}
{{- end }}

{{/*
Refuse a PodDisruptionBudget that no eviction can satisfy: Kubernetes accepts it, and every
node drain then retries the eviction of these pods until it times out. Blocking: maxUnavailable
0 or 0%; an integer minAvailable at or above the replicas; a minAvailable percentage that
Kubernetes (which rounds a percentage up) makes every replica. maxUnavailable, when set, is the
bound the budget renders, so the only one checked. The replicas are the Deployment's, or the
autoscaler's minReplicas (the least it may scale to); not a whole number of at least 1, they
are left to requireReplicas. The argument is a list: the budget's name (its values path), its
values, the replicas' name, the replicas, what its pods are ("controller", "gateway").
*/}}
{{- define "governor.requireEvictableBudget" -}}
{{- $name := index . 0 }}
{{- $budget := index . 1 }}
{{- $replicasName := index . 2 }}
{{- $replicas := index . 3 }}
{{- $pod := index . 4 }}
{{- $max := toString $budget.maxUnavailable }}
{{- $min := toString $budget.minAvailable }}
{{- if and (ne $max "") (ne $max "<nil>") }}
{{- if regexMatch "^0+%?$" $max }}
{{- fail (printf "%s.maxUnavailable (%s) lets no %s pod be evicted, so a node drain can never finish: set it to 1 or more (or a percentage above 0%%), or clear it and set %s.minAvailable below %s (%v)" $name $max $pod $name $replicasName $replicas) }}
{{- end }}
{{- else if and (or (kindIs "int" $replicas) (kindIs "int64" $replicas) (kindIs "float64" $replicas)) (regexMatch "^[0-9]+$" (toString $replicas)) (ge (int64 $replicas) 1) }}
{{- $n := int64 $replicas }}
{{- if regexMatch "^[0-9]+$" $min }}
{{- if ge (int64 $min) $n }}
{{- fail (printf "%s.minAvailable (%s) must be below %s (%d), or a node drain can never evict a %s pod: lower it or raise %s" $name $min $replicasName $n $pod $replicasName) }}
{{- end }}
{{- else if regexMatch "^[0-9]+%$" $min }}
{{- $percent := int64 (trimSuffix "%" $min) }}
{{- /* intstr.GetScaledValueFromIntOrPercent with roundUp, as the disruption controller does */}}
{{- $kept := div (add (mul $percent $n) 99) 100 }}
{{- if ge (int64 $kept) $n }}
{{- fail (printf "%s.minAvailable (%s) must be below %s (%d) once Kubernetes rounds it up (it comes to %d), or a node drain can never evict a %s pod: lower it to at most %d%% or raise %s" $name $min $replicasName $n $kept $pod (div (mul 100 (sub $n 1)) $n) $replicasName) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The TCP ports of the servers the controller's settings name (redis.url's hosts — Sentinels or
Cluster nodes too —, prometheus.url, kong.adminUrl), one per line: the NetworkPolicy lets the
controller reach them whatever egress rules say, so a Redis on 6380 is not cut off. A URL in
an existingSecret is not known here: the egress rules must allow it.
*/}}
{{- define "governor.egressPorts" -}}
{{- $urls := list }}
{{- if not .Values.redis.existingSecret }}{{ $urls = append $urls .Values.redis.url }}{{ end }}
{{- $urls = append $urls .Values.prometheus.url }}
{{- if .Values.kong.enabled }}{{ $urls = append $urls .Values.kong.adminUrl }}{{ end }}
{{- $defaults := dict "redis" 6379 "rediss" 6379 "redis+cluster" 6379 "rediss+cluster" 6379 "redis+sentinel" 26379 "rediss+sentinel" 26379 "http" 80 "https" 443 }}
{{- range $urls }}
{{- $scheme := regexFind "^[a-z+]+" (toString .) }}
{{- if hasKey $defaults $scheme }}
{{- $hosts := regexReplaceAll "^.*@" (regexReplaceAll "^[a-z+]+://([^/?#]*).*$" (toString .) "${1}") "" }}
{{- range splitList "," $hosts }}
{{- if regexMatch ":[0-9]+$" . }}
{{ regexFind "[0-9]+$" . }}
{{- else if . }}
{{ get $defaults $scheme }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
