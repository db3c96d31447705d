/*
 * JSON input the way QEMU 7.2's json-lexer.c, json-streamer.c and
 * json-parser.c read it, with their error texts: QMP's byte stream
 * (JsonStream) and whole texts such as `json:{...}` filenames and
 * qemu-storage-daemon's JSON options (parseQemuJson, qobject_from_json).
 *
 * Values are not line-delimited: the lexer turns bytes into tokens ({ } [
 * ] : , strings, numbers, keywords), the streamer collects tokens until
 * braces and brackets balance (or a lone scalar arrives) and then parses
 * that token list as one value. Strings may be double- or single-quoted
 * (a QEMU extension). Numbers follow the lexer's states: a character that
 * cannot continue an unfinished number (after `-`, `.`, `e`, a sign, or
 * a digit after a leading 0) is part of the bad token ("stray '1.}'"),
 * while a finished number simply ends before it. A character the lexer
 * cannot place yields "JSON parse error, stray 'C'"; then the lexer skips
 * input up to the next structural character or control character, as
 * QEMU's recovery state. Parser errors are "JSON parse error, …" with
 * QEMU's wording (missing : in object pair, expected separator in
 * dict/list, expecting value, invalid keyword 'x', duplicate key, …).
 * Either kind drops the tokens collected so far and the stream goes on:
 * the caller answers the error and keeps reading.
 *
 * End of input (`end`, json_message_parser_flush): an unfinished string
 * or number is a stray token (its text as far as it got), a finished one
 * is a token, and tokens left over are parsed as they are — usually
 * "premature EOI". parseQemuJson keeps qobject_from_json's rules on top:
 * the first value or error counts, a second value is "Expecting at most
 * one JSON value", no value at all "Expecting a JSON value".
 *
 * Limits (QEMU's): a value's tokens may total MAX_TOKEN_BYTES, there may
 * be MAX_TOKEN_COUNT of them and MAX_NESTING levels of nesting; beyond
 * each the collected value is dropped with QEMU's message. A single token
 * longer than MAX_TOKEN_BYTES is cut off the same way, so memory stays
 * bounded whatever a client sends.
 */

/** json-streamer.c's limits. */
export const MAX_TOKEN_BYTES = 64 << 20;
export const MAX_TOKEN_COUNT = 2 << 20;
export const MAX_NESTING = 1024;

type TokenType = '{' | '}' | '[' | ']' | ':' | ',' | 'string' | 'number' | 'keyword';
interface Token {
  type: TokenType;
  text: string;
}

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

/** One complete input: a value, or the error text QEMU answers with. */
export type StreamItem = { value: JsonValue } | { error: string };

const STRUCTURAL = '{}[]:,';
const WHITESPACE = ' \t\r\n';
/** A finished number (the lexer's terminal number states). */
const NUMBER_RE = /^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?$/;
/**
 * What `ch` does to the number text `tok` (json-lexer.c's number states):
 * continues it, ends a finished number, or makes it a bad token (an
 * unfinished number, or a digit after a leading 0).
 */
function numberStep(tok: string, ch: string): 'grow' | 'end' | 'error' {
  const digit = ch >= '0' && ch <= '9';
  const last = tok[tok.length - 1]!;
  let grows: boolean;
  if (/[eE]/.test(tok)) grows = digit || ((last === 'e' || last === 'E') && (ch === '+' || ch === '-'));
  else if (tok.includes('.')) grows = digit || (last !== '.' && (ch === 'e' || ch === 'E'));
  else if (last === '-') grows = digit;
  else if (/^-?0$/.test(tok)) {
    if (digit) return 'error';
    grows = ch === '.' || ch === 'e' || ch === 'E';
  } else grows = digit || ch === '.' || ch === 'e' || ch === 'E';
  if (grows) return 'grow';
  return NUMBER_RE.test(tok) ? 'end' : 'error';
}
const KEYWORD_CHARS = /[a-z]/;

type LexState = 'start' | 'string' | 'number' | 'keyword' | 'recovery';

/** Incremental tokenizer + streamer; `push` returns the values completed by a chunk. */
export class JsonStream {
  private readonly decoder = new TextDecoder('utf-8', { fatal: false });
  private state: LexState = 'start';
  private tok = '';
  private quote = '"';
  private escaped = false;
  private tokens: Token[] = [];
  private tokenBytes = 0;
  private braces = 0;
  private brackets = 0;
  private out: StreamItem[] = [];

  push(chunk: Uint8Array): StreamItem[] {
    const text = this.decoder.decode(chunk, { stream: true });
    for (const ch of text) this.feed(ch);
    const items = this.out;
    this.out = [];
    return items;
  }

  private feed(ch: string): void {
    switch (this.state) {
      case 'string':
        return this.feedString(ch);
      case 'number':
        switch (numberStep(this.tok, ch)) {
          case 'grow':
            return this.grow(ch);
          case 'error':
            return this.lexError(this.tok + ch);
          case 'end':
            this.emitToken('number', this.tok);
            return this.feed(ch);
        }
        return;
      case 'keyword':
        if (KEYWORD_CHARS.test(ch)) return this.grow(ch);
        this.emitToken('keyword', this.tok);
        return this.feed(ch);
      case 'recovery':
        if (STRUCTURAL.includes(ch) || (ch < ' ' && ch !== '\t') || ch === '\uFFFD') {
          this.state = 'start';
          if (ch === '\uFFFD') return;
          return this.feed(ch);
        }
        return;
      case 'start':
        return this.feedStart(ch);
    }
  }

  private feedStart(ch: string): void {
    if (WHITESPACE.includes(ch)) return;
    if (STRUCTURAL.includes(ch)) return this.emitToken(ch as TokenType, ch);
    this.tok = ch;
    if (ch === '"' || ch === "'") {
      this.state = 'string';
      this.quote = ch;
      this.escaped = false;
    } else if (ch === '-' || (ch >= '0' && ch <= '9')) this.state = 'number';
    else if (KEYWORD_CHARS.test(ch)) this.state = 'keyword';
    else this.lexError(ch);
  }

  private feedString(ch: string): void {
    if (ch < ' ') return this.lexError(this.tok + ch);
    this.grow(ch);
    if (this.escaped) this.escaped = false;
    else if (ch === '\\') this.escaped = true;
    else if (ch === this.quote) this.emitToken('string', this.tok);
  }

  private grow(ch: string): void {
    this.tok += ch;
    if (this.tok.length > MAX_TOKEN_BYTES) {
      this.state = 'recovery';
      this.tok = '';
      this.fail('JSON token size limit exceeded');
    }
  }

  /** End of input (json_message_parser_flush): finishes the token under way and parses what is left. */
  end(): StreamItem[] {
    if (this.state === 'string') this.lexError(this.tok);
    else if (this.state === 'number') {
      if (NUMBER_RE.test(this.tok)) this.emitToken('number', this.tok);
      else this.lexError(this.tok);
    } else if (this.state === 'keyword') this.emitToken('keyword', this.tok);
    this.state = 'start';
    if (this.tokens.length > 0) this.parseCollected();
    const items = this.out;
    this.out = [];
    return items;
  }

  private lexError(text: string): void {
    this.state = 'recovery';
    this.tok = '';
    this.fail(`JSON parse error, stray '${text}'`);
  }

  /** json_message_process_token. */
  private emitToken(type: TokenType, text: string): void {
    this.state = 'start';
    this.tok = '';
    if (type === '{') this.braces++;
    else if (type === '}') this.braces--;
    else if (type === '[') this.brackets++;
    else if (type === ']') this.brackets--;
    if (this.tokenBytes + text.length + 1 > MAX_TOKEN_BYTES) return this.fail('JSON token size limit exceeded');
    if (this.tokens.length + 1 > MAX_TOKEN_COUNT) return this.fail('JSON token count limit exceeded');
    if (this.braces + this.brackets > MAX_NESTING) return this.fail('JSON nesting depth limit exceeded');
    this.tokens.push({ type, text });
    this.tokenBytes += text.length;
    if ((this.braces > 0 || this.brackets > 0) && this.braces >= 0 && this.brackets >= 0) return;
    this.parseCollected();
  }

  private parseCollected(): void {
    const tokens = this.tokens;
    this.reset();
    try {
      this.out.push({ value: new TokenParser(tokens).parse() });
    } catch (e) {
      if (!(e instanceof JsonParseError)) throw e;
      this.out.push({ error: e.message });
    }
  }

  private fail(message: string): void {
    this.reset();
    this.out.push({ error: message });
  }

  private reset(): void {
    this.tokens = [];
    this.tokenBytes = 0;
    this.braces = 0;
    this.brackets = 0;
  }
}

class JsonParseError extends Error {
  constructor(what: string) {
    super(`JSON parse error, ${what}`);
  }
}

/** json-parser.c over one balanced token list. */
class TokenParser {
  private pos = 0;

  constructor(private readonly tokens: Token[]) {}

  parse(): JsonValue {
    return this.value();
  }

  private peek(): Token {
    const t = this.tokens[this.pos];
    if (!t) throw new JsonParseError('premature EOI');
    return t;
  }

  private next(): Token {
    const t = this.peek();
    this.pos++;
    return t;
  }

  private value(): JsonValue {
    const t = this.peek();
    switch (t.type) {
      case '{':
        return this.object();
      case '[':
        return this.array();
      case 'string':
        this.pos++;
        return unescape(t.text);
      case 'number':
        this.pos++;
        return Number(t.text);
      case 'keyword':
        this.pos++;
        if (t.text === 'true') return true;
        if (t.text === 'false') return false;
        if (t.text === 'null') return null;
        throw new JsonParseError(`invalid keyword '${t.text}'`);
      default:
        throw new JsonParseError('expecting value');
    }
  }

  private object(): JsonValue {
    this.next();
    const obj: { [key: string]: JsonValue } = {};
    if (this.peek().type === '}') return (this.next(), obj);
    for (;;) {
      // parse_pair: the key is parsed as any value first, so its own error comes first.
      const key = this.value();
      if (typeof key !== 'string') throw new JsonParseError('key is not a string in object');
      if (this.next().type !== ':') throw new JsonParseError('missing : in object pair');
      if (Object.prototype.hasOwnProperty.call(obj, key)) throw new JsonParseError('duplicate key');
      Object.defineProperty(obj, key, { value: this.value(), enumerable: true, writable: true, configurable: true });
      const sep = this.next();
      if (sep.type === '}') return obj;
      if (sep.type !== ',') throw new JsonParseError('expected separator in dict');
    }
  }

  private array(): JsonValue {
    this.next();
    const list: JsonValue[] = [];
    if (this.peek().type === ']') return (this.next(), list);
    for (;;) {
      list.push(this.value());
      const sep = this.next();
      if (sep.type === ']') return list;
      if (sep.type !== ',') throw new JsonParseError('expected separator in list');
    }
  }
}

const ESCAPES: Record<string, string> = { '"': '"', "'": "'", '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };

/** Four hex digits at `at` as a number, or -1 (cvt4hex). */
function hex4(text: string, at: number): number {
  const hex = text.slice(at, at + 4);
  return /^[0-9a-fA-F]{4}$/.test(hex) ? parseInt(hex, 16) : -1;
}

const SURROGATE_LEAD_FIRST = 0xd800;
const SURROGATE_LEAD_LAST = 0xdbff;
const SURROGATE_TRAIL_FIRST = 0xdc00;
const SURROGATE_TRAIL_LAST = 0xdfff;

/**
 * A `\uXXXX` escape starting at text[at] (the backslash), a surrogate pair
 * taken whole: the code point and where the escape ends, or QEMU's error
 * naming the escape's text ("\ud800 is not a valid Unicode character").
 */
function unicodeEscape(text: string, at: number): { cp: number; end: number } {
  let cp = hex4(text, at + 2);
  let end = at + 6;
  if (cp >= SURROGATE_LEAD_FIRST && cp <= SURROGATE_LEAD_LAST && text[end] === '\\' && text[end + 1] === 'u') {
    const trail = hex4(text, end + 2);
    if (trail >= SURROGATE_TRAIL_FIRST && trail <= SURROGATE_TRAIL_LAST) {
      cp = 0x10000 + ((cp & 0x3ff) << 10) + (trail & 0x3ff);
      end += 6;
    } else cp = -1;
  }
  if (cp < 0 || (cp >= SURROGATE_LEAD_FIRST && cp <= SURROGATE_TRAIL_LAST)) {
    // QEMU prints the escape up to the token's end (the closing quote included, nothing after).
    throw new JsonParseError(`${text.slice(at, Math.min(end, text.length))} is not a valid Unicode character`);
  }
  return { cp, end };
}

/** The value of a quoted string token (either quote), with QEMU's escape errors. */
function unescape(text: string): string {
  let out = '';
  for (let i = 1; i < text.length - 1; i++) {
    const ch = text[i]!;
    if (ch !== '\\') {
      out += ch;
      continue;
    }
    const e = text[i + 1]!;
    if (e === 'u') {
      const { cp, end } = unicodeEscape(text, i);
      out += String.fromCodePoint(cp);
      i = end - 1;
    } else if (ESCAPES[e] !== undefined) {
      out += ESCAPES[e];
      i++;
    } else throw new JsonParseError('invalid escape sequence in string');
  }
  return out;
}

/**
 * qobject_from_json: the one JSON value `text` holds; throws an Error with
 * QEMU's message (callers add their own prefix) otherwise.
 */
export function parseQemuJson(text: string): JsonValue {
  const stream = new JsonStream();
  const items = [...stream.push(Buffer.from(text, 'utf8')), ...stream.end()];
  const first = items[0];
  if (first === undefined) throw new Error('Expecting a JSON value');
  if ('error' in first) throw new Error(first.error);
  if (items.length > 1) throw new Error('Expecting at most one JSON value');
  return first.value;
}
