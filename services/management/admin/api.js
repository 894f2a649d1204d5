// The page's only way to the server: JSON over /api/v1 with the bearer token.
// Errors come back as problem+json (RFC 9457); `problem.errors` names refused fields.

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || { title: `HTTP ${status}`, status };
  }
  get fieldErrors() {
    return Array.isArray(this.problem.errors) ? this.problem.errors : [];
  }
}

export class Api {
  /**
   * @param {string} token bearer token
   * @param {(reason: string) => void} onUnauthorized called on 401 (expired or revoked token)
   */
  constructor(token, onUnauthorized) {
    this.token = token;
    this.onUnauthorized = onUnauthorized;
  }

  async call(method, path, body) {
    const headers = { Authorization: `Bearer ${this.token}`, Accept: 'application/json, application/problem+json' };
    const init = { method, headers, cache: 'no-store', credentials: 'omit', redirect: 'error' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(`/api/v1${path}`, init);
    } catch (e) {
      throw new ApiError(0, { title: 'The server cannot be reached', detail: `The server cannot be reached (${e.message}). Check the connection and try again.` });
    }
    const text = await res.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = { title: text.slice(0, 200) };
      }
    }
    if (res.status === 401) {
      this.onUnauthorized('The server no longer accepts this sign-in (it expired or was revoked).');
    }
    if (!res.ok) {
      throw new ApiError(res.status, data);
    }
    return data;
  }

  get(path) { return this.call('GET', path); }
  put(path, body) { return this.call('PUT', path, body); }
  post(path, body) { return this.call('POST', path, body); }
  del(path) { return this.call('DELETE', path); }
}

/** The claims of a JWT, without verifying it (the server does); null when malformed. */
export function jwtClaims(token) {
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const json = new TextDecoder().decode(Uint8Array.from(atob(b64.padEnd(Math.ceil(b64.length / 4) * 4, '=')), (c) => c.charCodeAt(0)));
    const claims = JSON.parse(json);
    return claims && typeof claims === 'object' ? claims : null;
  } catch {
    return null;
  }
}
