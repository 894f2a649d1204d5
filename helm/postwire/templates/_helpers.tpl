{{/*
Names, labels and shared pod fragments of the Postwire chart.
*/}}

{{- define "postwire.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "postwire.fullname" -}}
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

{{- define "postwire.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every resource; call with (dict "root" $ "component" "...") */}}
{{- define "postwire.labels" -}}
helm.sh/chart: {{ include "postwire.chart" .root }}
{{ include "postwire.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Values.image.tag | default .root.Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: postwire
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels; call with (dict "root" $ "component" "..." ["site" "<name>"]) */}}
{{- define "postwire.selectorLabels" -}}
app.kubernetes.io/name: {{ include "postwire.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .site }}
postwire.io/site-mailer: {{ . }}
{{- end }}
{{- end -}}

{{- define "postwire.image" -}}
{{- $img := .Values.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "postwire.management.fullname" -}}
{{- include "postwire.fullname" . -}}
{{- end -}}

{{- define "postwire.management.configName" -}}
{{- printf "%s-config" (include "postwire.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}

{{/* The in-cluster URL of the Management Service, the site mailers' default. */}}
{{- define "postwire.management.url" -}}
{{- printf "http://%s.%s.svc:%d" (include "postwire.fullname" .) .Release.Namespace (int .Values.management.service.port) -}}
{{- end -}}

{{/* POSTWIRE_PUBLIC_URL: the explicit value, else the first Ingress host, else empty. */}}
{{- define "postwire.management.publicUrl" -}}
{{- $m := .Values.management -}}
{{- if $m.publicUrl -}}
{{- $m.publicUrl -}}
{{- else if and $m.ingress.enabled $m.ingress.hosts -}}
{{- $host := (first $m.ingress.hosts).host -}}
{{- $tls := false -}}
{{- range $m.ingress.tls -}}
{{- if has $host (.hosts | default list) -}}{{- $tls = true -}}{{- end -}}
{{- end -}}
{{- printf "%s://%s" (ternary "https" "http" $tls) $host -}}
{{- end -}}
{{- end -}}

{{/* Name of one site mailer's resources; call with (dict "root" $ "site" $entry) */}}
{{- define "postwire.siteMailer.fullname" -}}
{{- printf "%s-site-%s" (include "postwire.fullname" .root) .site.name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{/*
The effective settings of every site mailer: each entry merged over siteMailerDefaults.
Returns YAML: {items: [...]}.
*/}}
{{- define "postwire.siteMailers" -}}
{{- $items := list -}}
{{- range .Values.siteMailers -}}
{{- $s := deepCopy $.Values.siteMailerDefaults -}}
{{- $_ := include "postwire.merge" (list $s (deepCopy .)) -}}
{{- $items = append $items $s -}}
{{- end -}}
{{- toYaml (dict "items" $items) -}}
{{- end -}}

{{/*
Merges (list $dst $src) into $dst in place: maps merge key by key, every other value
(scalars, lists, empty strings, false, 0) replaces. Unlike sprig's mergeOverwrite this does
not depend on the Helm version's handling of empty values.
*/}}
{{- define "postwire.merge" -}}
{{- $dst := index . 0 -}}
{{- $src := index . 1 -}}
{{- range $k, $v := $src -}}
{{- if and (kindIs "map" $v) (kindIs "map" (index $dst $k)) -}}
{{- $_ := include "postwire.merge" (list (index $dst $k) $v) -}}
{{- else -}}
{{- $_ := set $dst $k $v -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The fixed container security context of every Postwire container. */}}
{{- define "postwire.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The pod security context: fixed parts plus the configurable identity. */}}
{{- define "postwire.podSecurityContext" -}}
{{- $p := .Values.podSecurityContext -}}
runAsNonRoot: true
{{- if not (kindIs "invalid" $p.runAsUser) }}
runAsUser: {{ $p.runAsUser }}
{{- end }}
{{- if not (kindIs "invalid" $p.runAsGroup) }}
runAsGroup: {{ $p.runAsGroup }}
{{- end }}
{{- if not (kindIs "invalid" $p.fsGroup) }}
fsGroup: {{ $p.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Pod spec fields common to every Postwire pod. */}}
{{- define "postwire.podCommon" -}}
enableServiceLinks: false
automountServiceAccountToken: false
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "postwire.podSecurityContext" . | nindent 2 }}
{{- end -}}

{{/* An env entry read from a Secret key; call with (list "ENV_NAME" $secretRef) */}}
{{- define "postwire.secretEnv" -}}
{{- $name := index . 0 -}}
{{- $ref := index . 1 -}}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.existingSecret }}
      key: {{ $ref.key }}
{{- end -}}

{{/* Probe timing: the keys of a probeTiming value. */}}
{{- define "postwire.probe" -}}
{{- $path := index . 0 -}}
{{- $t := index . 1 -}}
httpGet:
  path: {{ $path }}
  port: http
initialDelaySeconds: {{ $t.initialDelaySeconds | default 0 }}
periodSeconds: {{ $t.periodSeconds | default 10 }}
timeoutSeconds: {{ $t.timeoutSeconds | default 3 }}
failureThreshold: {{ $t.failureThreshold | default 3 }}
{{- end -}}

{{/* Checks the schema cannot express; fails the render with a message naming the value. */}}
{{- define "postwire.validate" -}}
{{- $m := .Values.management -}}
{{- $replicas := ternary $m.autoscaling.maxReplicas $m.replicaCount $m.autoscaling.enabled -}}
{{- if and (gt (int $replicas) 1) (not .Values.secrets.redisUrl.existingSecret) -}}
{{- fail "secrets.redisUrl.existingSecret is empty, but more than one Management Service replica can run (management.replicaCount > 1 or management.autoscaling.enabled): Redis is required for multi-replica deployments" -}}
{{- end -}}
{{- if and $m.autoscaling.enabled (lt (int $m.autoscaling.maxReplicas) (int $m.autoscaling.minReplicas)) -}}
{{- fail "management.autoscaling.maxReplicas must be at least management.autoscaling.minReplicas" -}}
{{- end -}}
{{- if and $m.autoscaling.enabled (not (or $m.autoscaling.targetCPUUtilizationPercentage $m.autoscaling.targetMemoryUtilizationPercentage)) -}}
{{- fail "management.autoscaling needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" -}}
{{- end -}}
{{- if and $m.externalIssuer.enabled (not $m.externalIssuer.issuer) -}}
{{- fail "management.externalIssuer.issuer is required when management.externalIssuer.enabled is true" -}}
{{- end -}}
{{- $seen := dict -}}
{{- range .Values.siteMailers -}}
{{- $full := include "postwire.siteMailer.fullname" (dict "root" $ "site" .) -}}
{{- if hasKey $seen $full -}}
{{- fail (printf "siteMailers: the name %q is used twice (resource name %s)" .name $full) -}}
{{- end -}}
{{- $_ := set $seen $full true -}}
{{- end -}}
{{- end -}}

{{/* The settings (ConfigMap data) of one site mailer; call with (dict "root" $ "site" $s) */}}
{{- define "postwire.siteMailer.config" -}}
{{- $s := .site -}}
POSTWIRE_LISTEN: "0.0.0.0:8025"
POSTWIRE_DATA_DIR: /var/lib/postwire
POSTWIRE_MANAGEMENT_URL: {{ $s.managementUrl | default (include "postwire.management.url" .root) | quote }}
POSTWIRE_EGRESS_ALLOW: {{ $s.egressAllow | quote }}
POSTWIRE_LOG_FORMAT: {{ $s.logFormat | quote }}
{{- if $s.extraCa.configMap }}
POSTWIRE_EXTRA_CA_FILE: /etc/postwire/extra-ca/{{ $s.extraCa.key }}
{{- end }}
{{- end -}}
